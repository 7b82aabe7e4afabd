"""qsm-sweep report on synthetic run folders: known means, IQM and intervals; frames; baselines."""

import csv
import json

import numpy as np
import pytest
from scipy import stats

from qsm_robot.cli.sweep import main
from qsm_robot.sweep.report import (
    ReportError, ReportOptions, find_run_dirs, iqm_ci, load_baseline, make_report, mean_ci,
)

REPS = 300  # bootstrap resamples: enough for the checks, quick on 2 cores


def write_run(root, name, *, task="cartpole-swingup", preset="fast", seed=0, action_repeat=1, evals=(),
              updates_per_s=(), **config):
    """A run directory as qsm-train leaves it: config.json, eval.csv (step, time_s, return_mean) and train.csv."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"task": task, "preset": preset, "seed": seed, "action_repeat": action_repeat, "hidden_dim": 256, **config}
    (run / "config.json").write_text(json.dumps(cfg))
    with open(run / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "time_s", "return_mean", "return_std", "return_min", "return_max", "episodes"])
        for step, ret, t in evals:
            w.writerow([step, t, ret, 0, ret, ret, 10])
    with open(run / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "time_s", "steps_per_s", "updates_per_s"])
        for i, u in enumerate(updates_per_s):
            w.writerow([(i + 1) * 100, i, 0, u])
    return run


def rows_of(report, **match):
    return [r for r in report.rows if all(r[k] == v for k, v in match.items())]


def test_mean_interval_contains_the_mean_and_is_a_point_when_seeds_agree():
    est = mean_ci([100.0, 200.0, 300.0], reps=REPS)
    assert est.value == 200.0 and est.n == 3
    assert 100.0 <= est.low < est.value < est.high <= 300.0
    same = mean_ci([250.0] * 4, reps=REPS)
    assert (same.value, same.low, same.high) == (250.0, 250.0, 250.0)
    one = mean_ci([420.0], reps=REPS)
    assert one.low is None and one.cell() == "420.0 (n=1, no interval)"
    assert mean_ci([100.0, 200.0, 300.0], reps=REPS, seed=7) == mean_ci([100.0, 200.0, 300.0], reps=REPS, seed=7)


def test_iqm_of_known_scores():
    # 2 tasks x 4 runs with scores 0.0 .. 0.7: the IQM drops the lowest and highest 2 of 8: mean(0.2..0.5) = 0.35.
    per_task = [np.array([0.0, 0.2, 0.4, 0.6]), np.array([0.1, 0.3, 0.5, 0.7])]
    est = iqm_ci(per_task, reps=REPS)
    assert est.value == pytest.approx(0.35) and est.n == 8
    assert est.value == pytest.approx(stats.trim_mean(np.arange(8) / 10, 0.25))
    assert est.low <= 0.35 <= est.high and est.high - est.low > 0
    flat = iqm_ci([np.full(3, 0.5), np.full(5, 0.5)], reps=REPS)  # different run counts per task are fine
    assert (flat.value, flat.low, flat.high, flat.n) == (0.5, 0.5, 0.5, 8)
    assert iqm_ci([np.array([0.2]), np.array([0.4])], reps=REPS).low is None  # one run per task: no interval


def test_report_tables_in_frames_with_known_values(tmp_path, capsys):
    runs = tmp_path / "runs"
    # fast preset, action repeat 2: eval steps 500/1000/1500 are 1000/2000/3000 frames.
    for seed, scale in enumerate([1.0, 2.0, 3.0]):
        write_run(runs / "sweep" / "trials", f"fast{seed}", seed=seed, action_repeat=2,
                  evals=[(500, 100 * scale, 10.0), (1000, 200 * scale, 20.0), (1500, 300 * scale, 30.0)],
                  updates_per_s=[0, 50, 70])
    # reference preset: one seed that stops at 2000 frames, one that reaches 3000.
    write_run(runs, "ref0", preset="reference", seed=0, evals=[(1000, 150, 5.0), (2000, 250, 9.0)])
    write_run(runs, "ref1", preset="reference", seed=1, evals=[(1000, 350, 6.0), (2000, 450, 11.0), (3000, 900, 15.0)])
    write_run(runs, "walker", task="walker-walk", seed=0, action_repeat=2, evals=[(1500, 500, 40.0)])
    (runs / "empty").mkdir()
    write_run(runs, "no-evals-yet", seed=9)

    report = make_report([runs], ReportOptions(budgets=[2000, 2500, 3000], target_return=400, reps=REPS))
    assert report.tasks == ["cartpole-swingup", "walker-walk"]
    # At 2000 frames the fast runs give their eval at step 1000 (x2 = 2000 frames): 200, 400, 600.
    [r] = rows_of(report, metric="return", task="cartpole-swingup", label="fast", budget_frames=2000)
    assert (r["value"], r["n"]) == (400.0, 3) and r["ci_low"] < 400 < r["ci_high"]
    # At 2500 frames: the latest eval at or before it, still the 2000-frame one.
    assert rows_of(report, metric="return", task="cartpole-swingup", label="fast", budget_frames=2500)[0]["value"] == 400.0
    assert rows_of(report, metric="return", task="cartpole-swingup", label="fast", budget_frames=3000)[0]["value"] == 600.0
    # reference at 3000 frames: only the seed that got there counts, and the table says n=1.
    [ref] = rows_of(report, metric="return", label="reference", budget_frames=3000)
    assert (ref["value"], ref["n"], ref["ci_low"]) == (900.0, 1, "")
    assert "900.0 (n=1, no interval)" in report.markdown
    [wall] = rows_of(report, metric="wall_time_s", label="fast", budget_frames=2000)
    assert wall["value"] == 20.0
    [ups] = rows_of(report, metric="updates_per_s", label="fast", task="cartpole-swingup")
    assert ups["value"] == 60.0  # the mean of the rates once updates run (0 is before learning starts)
    [hit] = rows_of(report, metric="frames_to_return>=400", label="fast", task="cartpole-swingup")
    assert hit["value"] == 2000.0 and hit["note"] == "2 of 3 runs reached it"  # seeds 1 and 2, at 2000 frames
    # Across tasks at 3000 frames, fast has cartpole's 3 runs (0.3, 0.6, 0.9) and walker's one (0.5).
    [iqm] = rows_of(report, metric="iqm_return/1000", label="fast", budget_frames=3000)
    assert iqm["value"] == pytest.approx(stats.trim_mean([0.3, 0.6, 0.9, 0.5], 0.25)) and iqm["n"] == 4
    assert iqm["note"] == "2 of 2 tasks"
    assert "| fast | 3 | 400.0 [" in report.markdown and "3k frames" in report.markdown
    assert any("no-evals-yet" in w for w in report.warnings)
    # default budget: the largest frame count every run reached (ref0 stops at 2000 frames).
    assert make_report([runs], ReportOptions(reps=REPS)).budgets == [2000.0]

    out = tmp_path / "out"
    assert main(["report", str(runs), "--out", str(out), "--budgets", "2k", "3k", "--reps", str(REPS)]) == 0
    for name in ("report.md", "report.csv", "curves.png", "iqm.png", "profile.png", "runs.jsonl"):
        assert (out / name).stat().st_size > 0
    with open(out / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["budget_frames"] for r in table if r["metric"] == "return"} == {"2000", "3000"}
    assert "## Across tasks: IQM of return/1000" in capsys.readouterr().out


def test_the_run_archive_rebuilds_regroups_and_extends_a_report_without_the_run_folders(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_run(runs, f"narrow{seed}", seed=seed, hidden_dim=64, action_repeat=2, updates_per_s=[40 + seed],
                  evals=[(500, 100 + seed, 5.0), (1000, 300 + 10 * seed, 9.0)])
    write_run(runs, "wide", seed=0, hidden_dim=512, task="walker-walk", evals=[(2000, 700, 30.0)])
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out), "--budgets", "1k", "2k", "--reps", str(REPS)]) == 0
    before = make_report([runs], ReportOptions(budgets=[1000, 2000], reps=REPS))
    archive = out / "runs.jsonl"
    assert len(archive.read_text().splitlines()) == 4

    import shutil

    shutil.rmtree(runs)  # the run folders are gone: the archive alone rebuilds the same figures
    rebuilt = make_report([archive], ReportOptions(budgets=[1000, 2000], reps=REPS))
    assert rebuilt.rows == before.rows
    regrouped = make_report([archive], ReportOptions(budgets=[2000], label_by=["hidden_dim"], reps=REPS))
    assert {r["label"] for r in regrouped.rows} == {"hidden_dim=64", "hidden_dim=512"}

    # New runs join the archived ones; a run both in a folder and in the archive counts once.
    more = tmp_path / "more"
    write_run(more, "narrow3", seed=3, hidden_dim=64, action_repeat=2, evals=[(1000, 500, 9.0)])
    extended = make_report([archive, more], ReportOptions(budgets=[2000], reps=REPS))
    [r] = rows_of(extended, metric="return", task="cartpole-swingup", budget_frames=2000)
    assert (r["n"], r["value"]) == (4, pytest.approx((300 + 310 + 320 + 500) / 4))
    assert main(["report", str(archive), str(more), "--out", str(tmp_path / "both"), "--reps", str(REPS)]) == 0
    again = make_report([tmp_path / "both" / "runs.jsonl", archive], ReportOptions(budgets=[2000], reps=REPS))
    assert rows_of(again, metric="return", task="cartpole-swingup", budget_frames=2000)[0]["n"] == 4
    assert sum("the same run as" in w for w in again.warnings) == 4
    # A run that went on after it was archived: its folder's longer copy is the one counted.
    write_run(more, "narrow0", seed=0, hidden_dim=64, action_repeat=2,
              evals=[(500, 100, 5.0), (1000, 300, 9.0), (1500, 900, 12.0)])
    record = json.loads(archive.read_text().splitlines()[0])
    record["source"] = str((more / "narrow0").resolve())  # the same run: its folder moved with it
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps(record) + "\n")
    for order in ([renamed, more], [more, renamed]):
        grown = make_report(order, ReportOptions(budgets=[3000], reps=REPS))
        [r] = rows_of(grown, metric="return", task="cartpole-swingup", budget_frames=3000, label="fast")
        assert (r["n"], r["value"]) == (1, 900.0)

    # A damaged archive is a clear error that names the line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(archive.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ReportError, match="bad.jsonl line 2 is not a run record"):
        make_report([bad], ReportOptions(reps=REPS))
    short = json.loads(archive.read_text().splitlines()[0])
    short["returns"] = short["returns"][:1]
    bad.write_text(json.dumps(short) + "\n")
    with pytest.raises(ReportError, match="line 1: frames, returns .* must be equally long"):
        make_report([bad], ReportOptions(reps=REPS))
    (tmp_path / "notes.txt").write_text("x")
    assert main(["report", str(tmp_path / "notes.txt")]) == 2
    assert "is a file but not a run archive" in capsys.readouterr().err


def test_baselines_are_grouped_tabled_and_checked(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a", seed=0, evals=[(1000, 300, 1.0)])
    write_run(runs, "b", seed=1, evals=[(1000, 500, 1.0)])
    base = tmp_path / "sac.csv"
    base.write_text("task,frames,return,seed\n" + "".join(
        f"cartpole-swingup,{f},{r},{s}\n" for s in (0, 1) for f, r in ((500, 100 + s), (1000, 700 + 100 * s))))
    curves = load_baseline(base)
    assert [(c.label, c.seed, list(c.frames)) for c in curves] == [("sac", "0", [500.0, 1000.0]), ("sac", "1", [500.0, 1000.0])]
    report = make_report([runs], ReportOptions(baselines=[base], reps=REPS))
    [r] = rows_of(report, metric="return", label="sac", kind="baseline")
    assert (r["value"], r["n"]) == (750.0, 2)
    assert "| sac (baseline) | 2 |" in report.markdown
    bad = tmp_path / "bad.csv"
    bad.write_text("task,step,return,seed\ncartpole-swingup,1,2,0\n")
    with pytest.raises(ReportError, match="has no column 'frames'"):
        load_baseline(bad)


def test_label_by_splits_groups_and_mixed_groups_are_flagged(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "narrow", seed=0, hidden_dim=64, evals=[(1000, 100, 1.0)])
    write_run(runs, "wide", seed=0, hidden_dim=512, evals=[(1000, 300, 1.0)])
    merged = make_report([runs], ReportOptions(reps=REPS))
    assert any("differ in hidden_dim" in w and "--label-by preset hidden_dim" in w for w in merged.warnings)
    split = make_report([runs], ReportOptions(label_by=["preset", "hidden_dim"], reps=REPS))
    assert {r["label"] for r in split.rows} == {"fast, hidden_dim=64", "fast, hidden_dim=512"}
    assert not split.warnings
    with pytest.raises(ReportError, match="label_by: tau_x is not a field"):
        make_report([runs], ReportOptions(label_by=["tau_x"], reps=REPS))
    # A run made before a field existed (its config.json lacks it) ran with the field's default.
    write_run(runs, "new", seed=1, hidden_dim=64, q_grad_normalize=True, evals=[(1000, 200, 1.0)])
    by_target = make_report([runs], ReportOptions(label_by=["hidden_dim", "q_grad_normalize"], reps=REPS))
    assert {r["label"] for r in by_target.rows} == {
        "hidden_dim=64, q_grad_normalize=False", "hidden_dim=512, q_grad_normalize=False",
        "hidden_dim=64, q_grad_normalize=True"}
    # A sweep's grid fields label its groups by default.
    sweep = tmp_path / "sweep"
    write_run(sweep / "trials", "x", seed=0, q_grad_scale=30.0, evals=[(1000, 100, 1.0)])
    (sweep / "sweep.json").write_text(json.dumps({"spec": {"grid": {"q_grad_scale": [30.0]}}}))
    assert {r["label"] for r in make_report([sweep], ReportOptions(reps=REPS)).rows} == {"fast, q_grad_scale=30.0"}
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_dirs_are_found_at_any_depth(tmp_path):
    a = write_run(tmp_path / "x" / "y", "a", evals=[(1, 1, 1)])
    b = write_run(tmp_path, "b", evals=[(1, 1, 1)])
    assert find_run_dirs([tmp_path, tmp_path / "x"]) == sorted([a.resolve(), b.resolve()])
