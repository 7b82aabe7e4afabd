"""A tiny sweep on a local Ray: a trial's process dies mid-run and is resumed from its checkpoint.

One Ray session (2 CPUs, no dashboard) runs two smoke trials of 400 steps; the test hook makes
seed 0's process exit (os._exit) once, at its first evaluation after a checkpoint. Tune retries it
(FailureConfig) and the trial function resumes its run directory from the checkpoint. The other
tests reuse that sweep: the same command again skips every trial without starting Ray, and the
report reads the trials.
"""

import csv
import json

import pytest

from qsm_robot.cli.sweep import main
from qsm_robot.sweep import runner
from qsm_robot.train.checkpoint import load_train_state

pytest.importorskip("ray")

TRIAL0, TRIAL1 = "cartpole-swingup__smoke__seed0", "cartpole-swingup__smoke__seed1"


def sweep_args(sweep):
    return ["run", str(sweep), "--tasks", "cartpole-swingup", "--presets", "smoke", "--seeds", "0", "1",
            "--steps", "400", "--set", "checkpoint_every=100", "--set", "eval_every=200", "--set", "learning_starts=150",
            "--cpus-per-trial", "1", "--max-failures", "2", "--num-cpus", "2", "--progress-every", "2"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Run the sweep once for this module: (sweep folder, exit code, stderr)."""
    import io
    from contextlib import redirect_stderr

    sweep = tmp_path_factory.mktemp("sweep") / "s"
    mp = pytest.MonkeyPatch()
    mp.setenv(runner.CRASH_ENV, TRIAL0)
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            code = main(sweep_args(sweep))
    finally:
        mp.undo()
    return sweep, code, err.getvalue()


def test_a_killed_trial_resumes_from_its_checkpoint(tiny_sweep):
    sweep, code, err = tiny_sweep
    assert code == 0, err
    run0, run1 = sweep / "trials" / TRIAL0, sweep / "trials" / TRIAL1
    # Seed 0's process died at step 200 (its eval there), after the checkpoint at step 100 ...
    attempts = runner.read_attempts(run0)
    assert [(a["start_step"], a["resumed"]) for a in attempts] == [(0, False), (100, True)]
    assert attempts[0]["pid"] != attempts[1]["pid"]  # a new process
    assert f"trial {TRIAL0} died; retrying it from its checkpoint at step 100" in err
    assert "exiting the trial process at step 200" in (run0 / runner.TRIAL_LOG).read_text()
    # ... and the retry finished the run from there: final checkpoint, evals logged once each.
    for run in (run0, run1):
        ckpt, state = load_train_state(run)
        assert state["step"] == 400 and ckpt.name == "step_000000400"
        assert [int(r["step"]) for r in csv.DictReader(open(run / "eval.csv"))] == [200, 400]
        config = json.loads((run / "config.json").read_text())
        assert (config["threads"], config["device"], config["run_dir"]) == (1, "cpu", str(run.resolve()))
    assert [(a["start_step"], a["resumed"]) for a in runner.read_attempts(run1)] == [(0, False)]
    assert "2/2 trials finished (1 restarts from a checkpoint)" in err
    assert "sweep: 2/2 done, 0 running, 0 failed, 0 pending, 1 retried" in err
    stored = json.loads((sweep / "sweep.json").read_text())
    assert stored["trials"] == [TRIAL0, TRIAL1] and stored["spec"]["set"]["steps"] == 400


def test_running_a_finished_sweep_again_skips_every_trial(tiny_sweep, capsys, monkeypatch):
    sweep, code, _ = tiny_sweep
    assert code == 0
    monkeypatch.setattr(runner, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    before = sorted(p.name for p in (sweep / "tune").iterdir())
    assert main(sweep_args(sweep)) == 0
    assert main(["run", "--resume", str(sweep)]) == 0
    assert capsys.readouterr().err.count("all 2 trials of") == 2
    assert sorted(p.name for p in (sweep / "tune").iterdir()) == before
    assert [len(runner.read_attempts(sweep / "trials" / t)) for t in (TRIAL0, TRIAL1)] == [2, 1]


def test_the_report_reads_the_trials(tiny_sweep, tmp_path):
    sweep, code, _ = tiny_sweep
    assert code == 0
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--out", str(out), "--reps", "200"]) == 0
    rows = list(csv.DictReader(open(out / "report.csv")))
    [ret] = [r for r in rows if r["metric"] == "return"]
    assert (ret["label"], ret["budget_frames"], ret["n"]) == ("smoke", "400", "2")
