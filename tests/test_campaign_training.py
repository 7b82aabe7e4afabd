"""Training durability: a run killed before its first checkpoint resumes from step 0, and the fast
part of campaigns/train_durability.py (kill -9 at fixed moments, then check and resume)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from campaigns.train_durability import kill_delays, run_trial
from qsm_robot.cli.train import main
from qsm_robot.config import preset_config
from qsm_robot.qsm.policy import CheckpointError
from qsm_robot.train.checkpoint import has_checkpoint, load_train_state
from qsm_robot.train.loop import prepare_run_dir
from qsm_robot.train.run_log import read_csv

SMOKE = ["--preset", "smoke", "--threads", "1", "--eval-episodes", "1"]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_again_from_step_0(tmp_path, capsys):
    # What a kill -9 before the first checkpoint leaves: config.json, log rows past step 0,
    # a half-written checkpoint folder and latest.json temporary.
    run = tmp_path / "killed"
    prepare_run_dir(preset_config("smoke", threads=1, eval_episodes=1, steps=100_000, run_dir=str(run)).validate())
    (run / "train.csv").write_text("step,time_s\n100,0.5\n200,1.0\n")
    (run / "checkpoints" / ".tmp-step_000000500-4242").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step_000000500-4242" / "policy.json").write_text("{")
    (run / "checkpoints" / ".latest.json.tmp-4242").write_text("{")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_train_state(run)  # the temporaries are not taken for a checkpoint
    assert main(SMOKE + ["--steps", "300", "--run-dir", str(run)]) == 2
    assert f"already holds a run: continue it with --resume {run}" in capsys.readouterr().err

    assert main(["--resume", str(run), "--steps", "300"]) == 0
    err = capsys.readouterr().err
    assert f"resuming {run} at step 0 of 300 (it holds no checkpoint yet" in err
    assert has_checkpoint(run) and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step_000000300"]
    assert [int(r["step"]) for r in read_csv(run / "train.csv")] == [100, 200, 300]
    assert json.loads((run / "config.json").read_text())["steps"] == 300

    # Starting again from step 0 is the same as never having been stopped.
    fresh = tmp_path / "fresh"
    assert main(SMOKE + ["--steps", "300", "--run-dir", str(fresh)]) == 0
    (ca, _), (cb, _) = load_train_state(run), load_train_state(fresh)
    for name in ("policy.safetensors", "train_state.safetensors"):
        a, b = load_file(str(ca / name)), load_file(str(cb / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_run_with_a_checkpoint_removes_stale_temporaries(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(SMOKE + ["--steps", "200", "--run-dir", str(run)]) == 0
    (run / "checkpoints" / ".tmp-step_000000300-4242").mkdir()
    (run / "checkpoints" / ".latest.json.tmp-4242.json").write_text("{")
    (run / ".config.json.tmp-4242.json").write_text("{")
    (run / ".learning_curve.png.tmp-4242.png").write_bytes(b"")
    assert main(["--resume", str(run), "--steps", "300"]) == 0
    assert f"resuming {run} at step 200 of 300\n" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step_000000200", "step_000000300"]
    assert not list(run.glob(".*.tmp-*"))


def test_kill_delays_cover_the_window_in_every_slice():
    delays = kill_delays(4, 6.0, seed=3)
    assert delays == kill_delays(4, 6.0, seed=3)
    assert sorted(int(d // 1.5) for d in delays) == [0, 1, 2, 3]


@pytest.mark.parametrize("clock,kill_after_s", [
    ("start", 0.2),        # during start-up: no config.json yet, nothing to resume
    ("config", 0.0),       # config.json written, no checkpoint yet: the resume starts from step 0
    ("checkpoint", 0.3),   # after the first checkpoint: the resume starts from the latest one
])
def test_kill_9_at_any_moment_then_resume(tmp_path, clock, kill_after_s):
    row = run_trial(tmp_path, kill_after_s, extra_steps=100, clock=clock)
    assert row["ok"], row
    assert row["resume_rc"] == 0 and row["final_step"] == (row["ckpt_step"] or 0) + 100
    if clock == "start":
        assert row["at_kill"] == "no config.json" and row["resumed_from"] == "new run"
    elif clock == "config":
        assert row["at_kill"] == "config.json" and row["ckpt_step"] is None
        assert row["loads_ok"] == "none" and row["resumed_from"] == 0
    else:
        assert row["at_kill"] == "checkpoint" and row["ckpt_step"] >= 100 and row["ckpt_step"] % 100 == 0
        assert row["loads_ok"] == "yes" and row["resumed_from"] == row["ckpt_step"]
