"""The learning report: where each preset stands, per task and across tasks, with intervals.

It reads any folders of run directories (a run directory holds config.json and eval.csv: sweep
trials, plain qsm-train runs, benchmark runs) and any run archives (an earlier report's
runs.jsonl), groups the runs by (label, task), where the label is the preset (or the config.json
fields of ``label_by``), and writes into the output folder:

    report.md    per task: eval return at each budget (mean, 95% CI, n runs) with the wall time
                 to it, frames to a target return, updates/s; across tasks: IQM of return/1000
    report.csv   the same figures, one per row (metric, task, label, budget_frames, n, value, CI)
    curves.png   learning curves, one panel per task, labels overlaid, 95% CI bands, baselines
    iqm.png      IQM of return/1000 with its CI, per label and budget
    profile.png  performance profile (fraction of runs with return/1000 > tau) at the last budget
    runs.jsonl   the run archive: each run's config and evaluations, one JSON object per line. Run
                 folders are working files (git-ignored, lost with the machine); the archive is
                 small enough to commit beside the report, so a report can be rebuilt, regrouped
                 or extended with new runs from it alone (pass it in place of a folder).

Every axis and table is in **frames**: the task's own control steps, eval.csv's ``step`` (policy
steps) x config.json's ``action_repeat``. At a budget each run contributes its latest evaluation
at or before the budget; a run whose last evaluation is short of the budget is left out of that
budget's figures, and every figure says how many runs (n) it has.

Statistics are rliable's (Agarwal et al., 2021). The per-task mean's interval is rliable's
stratified bootstrap (``library.get_interval_estimates``, percentile method) on that one task,
which is the ordinary bootstrap over the runs; the across-task IQM is ``metrics.aggregate_iqm``
(25% trimmed mean of all runs' return/1000) with the stratified bootstrap over runs within each
task (``StratifiedIndependentBootstrap``, so tasks may have different run counts); the
learning-curve bands are the same bootstrap of the mean at each frame count, and the profile is
rliable's run-score distribution with its bootstrap band. With one run a figure says "n=1, no
interval" instead of inventing one. rliable draws from numpy's global generator; the report seeds
it (``seed``) and restores it, so a report is reproducible.

External baselines are CSV files with columns task, frames, return, seed and optionally method
(default: the file's name); they are grouped, tabled and drawn like the runs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qsm_robot.config import TrainConfig
from qsm_robot.files import atomic_write, atomic_write_text

SCORE_SCALE = 1000.0
"""dm_control returns are in [0, 1000]: the across-task score is return / 1000."""
SAME_GROUP_FIELDS_IGNORED = {
    "seed", "run_dir", "threads", "device", "steps", "log_every", "checkpoint_every", "keep_checkpoints",
    "eval_every",
}
"""config.json fields that may differ between the runs of one group without a warning."""
RUNS_ARCHIVE = "runs.jsonl"
"""The report's run archive (see the module docstring)."""
REPORT_FILES = ("report.md", "report.csv", "curves.png", "iqm.png", "profile.png", RUNS_ARCHIVE)


class ReportError(ValueError):
    """Bad report input (no runs, a bad baseline CSV or run archive, an unknown --label-by field)."""


@dataclass
class Curve:
    """One run's (or one baseline seed's) eval returns against frames."""

    label: str
    task: str
    seed: str
    source: str
    """The run directory or baseline CSV it came from."""
    frames: np.ndarray
    returns: np.ndarray
    times: np.ndarray | None = None
    """Training wall time (s) at each evaluation; None for baselines."""
    updates_per_s: float | None = None
    baseline: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def last_frames(self) -> float:
        return float(self.frames[-1])

    def index_at(self, budget: float) -> int | None:
        """The latest evaluation at or before ``budget``; None if the run never got that far."""
        if self.last_frames < budget:
            return None
        return int(np.searchsorted(self.frames, budget, side="right")) - 1 if self.frames[0] <= budget else None

    def frames_to(self, target: float) -> float | None:
        """Frames of the first evaluation with return >= ``target`` (None if none)."""
        hit = np.nonzero(self.returns >= target)[0]
        return float(self.frames[hit[0]]) if hit.size else None


@dataclass
class Estimate:
    """A point estimate with its interval over ``n`` runs (no interval when n < 2)."""

    value: float
    low: float | None
    high: float | None
    n: int

    def cell(self, digits: int = 1, extra: str = "") -> str:
        if self.n == 0:
            return "- (n=0)"
        v = f"{self.value:.{digits}f}"
        if self.low is None:
            return f"{v} (n={self.n}{extra}, no interval)"
        return f"{v} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n}{extra})"


@dataclass
class ReportOptions:
    """What the report compares, and how."""

    budgets: list[float] | None = None
    """Frames at which returns are compared; None: the largest frame count every run reached."""
    target_return: float | None = None
    """Report the frames each group took to first reach this eval return (None: leave it out)."""
    label_by: list[str] | None = None
    """config.json fields that name a group; None: preset (plus a sweep's grid fields)."""
    baselines: list[Path] = field(default_factory=list)
    """CSV files of other methods' curves: task, frames, return, seed[, method]."""
    reps: int = 2000
    """Bootstrap resamples per interval."""
    confidence: float = 0.95
    """Coverage of every interval."""
    seed: int = 0
    """Seed of the bootstrap (numpy's global generator, restored afterwards)."""


# --- statistics (rliable) ----------------------------------------------------------------------
@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """rliable resamples with numpy's global generator: seed it, and restore it afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def mean_ci(values: np.ndarray | list[float], reps: int = 2000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean over runs with its bootstrap interval: rliable's stratified bootstrap on one task.

    With one task the stratified bootstrap is the ordinary (percentile) bootstrap over the runs.
    One run: no interval. All runs equal: the interval is that point.
    """
    from rliable import library

    x = np.asarray(values, dtype=float).reshape(-1, 1)
    if x.shape[0] == 0:
        return Estimate(math.nan, None, None, 0)
    if x.shape[0] == 1:
        return Estimate(float(x[0, 0]), None, None, 1)
    with seeded(seed):
        point, interval = library.get_interval_estimates(
            {"x": x}, lambda s: np.array([np.mean(s)]), reps=reps, confidence_interval_size=confidence)
    return Estimate(float(point["x"][0]), float(interval["x"][0, 0]), float(interval["x"][1, 0]), x.shape[0])


def iqm_ci(per_task: list[np.ndarray | list[float]], reps: int = 2000, confidence: float = 0.95,
           seed: int = 0) -> Estimate:
    """Interquartile mean of all runs' scores over tasks, with the stratified bootstrap over runs.

    ``per_task`` holds each task's run scores (tasks may have different run counts). The IQM is
    rliable's ``aggregate_iqm`` (25% trimmed mean of the pooled scores); the interval resamples
    runs within each task (rliable's ``StratifiedIndependentBootstrap``). With at most one run per
    task there is no interval.
    """
    from rliable import library, metrics

    arrays = [np.asarray(a, dtype=float).reshape(-1, 1) for a in per_task if len(a)]
    n = sum(a.shape[0] for a in arrays)
    if n == 0:
        return Estimate(math.nan, None, None, 0)

    def iqm(*xs: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(np.concatenate([x.ravel() for x in xs]))])

    value = float(iqm(*arrays)[0])
    if max(a.shape[0] for a in arrays) < 2:
        return Estimate(value, None, None, n)
    with seeded(seed):
        _, interval = library.get_interval_estimates({"x": arrays}, iqm, reps=reps, confidence_interval_size=confidence)
    return Estimate(value, float(interval["x"][0, 0]), float(interval["x"][1, 0]), n)


def curve_band(matrix: np.ndarray, reps: int = 2000, confidence: float = 0.95, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Mean over runs (rows) at each point (column), with the bootstrap band; no band for one run."""
    from rliable import library

    matrix = np.asarray(matrix, dtype=float)
    mean = matrix.mean(axis=0)
    if matrix.shape[0] < 2:
        return mean, None, None
    with seeded(seed):
        _, interval = library.get_interval_estimates(
            {"x": matrix[:, None, :]}, lambda s: np.mean(s, axis=0)[0], reps=reps, confidence_interval_size=confidence)
    return mean, interval["x"][0], interval["x"][1]


def score_profile(per_task: list[np.ndarray], taus: np.ndarray, reps: int = 2000, confidence: float = 0.95,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """rliable's run-score distribution (fraction of runs with score > tau) and its bootstrap band."""
    from rliable import library

    arrays = [np.asarray(a, dtype=float).reshape(-1, 1) for a in per_task if len(a)]

    def profile(*xs: np.ndarray) -> np.ndarray:
        return library.score_distributions(np.concatenate([x.ravel() for x in xs]), taus)

    point = profile(*arrays)
    if max(a.shape[0] for a in arrays) < 2:
        return point, None
    with seeded(seed):
        _, interval = library.get_interval_estimates({"x": arrays}, profile, reps=reps, confidence_interval_size=confidence)
    return point, interval["x"]


# --- reading runs ------------------------------------------------------------------------------
def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Every run directory (config.json + eval.csv) at or below ``paths``, sorted, without duplicates."""
    found: set[Path] = set()
    for root in paths:
        if not root.exists():
            raise ReportError(f"dirs: {root} does not exist")
        for here, subdirs, files in os.walk(root):
            if "config.json" in files and "eval.csv" in files:
                found.add(Path(here).resolve())
                subdirs[:] = []  # a run directory holds no other runs
            else:
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(found)


def default_label_by(paths: list[Path]) -> list[str]:
    """preset, plus the grid fields of any sweep (sweep.json) among ``paths``."""
    fields = ["preset"]
    for root in paths:
        try:
            grid = json.loads((root / "sweep.json").read_text())["spec"].get("grid", {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        fields += [k for k in grid if k not in fields]
    return fields


def group_label(config: dict[str, Any], label_by: list[str]) -> str:
    return ", ".join(str(config.get(f)) if f == "preset" else f"{f}={config.get(f)}" for f in label_by)


def _floats(rows: list[dict[str, str]], key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows], dtype=float)


def _numeric(row: dict[str, str], keys: tuple[str, ...]) -> bool:
    """Whether the row has a number under each key (a row cut short by a kill has not)."""
    try:
        return all(math.isfinite(float(row[k])) for k in keys)
    except (KeyError, TypeError, ValueError):
        return False


def _fill_defaults(config: dict[str, Any], label_by: list[str], where: str) -> None:
    """Set each ``label_by`` field that ``config`` lacks to TrainConfig's default: a run made
    before a field existed ran with its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name in label_by:
        if name not in config:
            if name not in defaults:
                raise ReportError(f"label_by: {name} is not a field of {where}")
            config[name] = defaults[name]


def load_run(run_dir: Path, label_by: list[str]) -> Curve | None:
    """A run directory as a Curve (None when it has no evaluation yet)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"config.json: cannot read {run_dir / 'config.json'}: {exc}") from None
    _fill_defaults(config, label_by, str(run_dir / "config.json"))
    with open(run_dir / "eval.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if _numeric(r, ("step", "time_s", "return_mean"))]
    if not rows:
        return None
    repeat = int(config.get("action_repeat", 1))
    order = np.argsort(_floats(rows, "step"), kind="stable")
    rows = [rows[i] for i in order]
    ups = None
    if (run_dir / "train.csv").exists():
        with open(run_dir / "train.csv", newline="") as f:
            rates = [float(r["updates_per_s"]) for r in csv.DictReader(f) if _numeric(r, ("updates_per_s",))]
        rates = [r for r in rates if r > 0]
        ups = float(np.mean(rates)) if rates else None
    return Curve(
        label=group_label(config, label_by), task=str(config.get("task")), seed=str(config.get("seed")),
        source=str(run_dir), frames=_floats(rows, "step") * repeat, returns=_floats(rows, "return_mean"),
        times=_floats(rows, "time_s"), updates_per_s=ups, config=config,
    )


def archive_record(curve: Curve) -> dict[str, Any]:
    """One line of runs.jsonl: what :func:`load_archive` needs to rebuild ``curve``."""
    return {"source": curve.source, "config": curve.config, "frames": curve.frames.tolist(),
            "returns": curve.returns.tolist(), "times": None if curve.times is None else curve.times.tolist(),
            "updates_per_s": curve.updates_per_s}


def load_archive(path: Path, label_by: list[str]) -> list[Curve]:
    """The runs of a run archive (runs.jsonl), labelled by ``label_by`` like run directories."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ReportError(f"archive: cannot read {path}: {exc.strerror or exc}") from None
    curves = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            config = dict(record["config"])
            frames, returns = np.asarray(record["frames"], float), np.asarray(record["returns"], float)
            times = None if record.get("times") is None else np.asarray(record["times"], float)
            ups = record.get("updates_per_s")
            ok = (frames.ndim == 1 and frames.size > 0 and frames.shape == returns.shape
                  and (times is None or times.shape == frames.shape) and bool(np.all(np.diff(frames) >= 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ReportError(f"archive: {path} line {number} is not a run record ({exc})") from None
        if not ok:
            raise ReportError(f"archive: {path} line {number}: frames, returns (and times) must be equally long, "
                              "non-empty lists with frames in increasing order")
        _fill_defaults(config, label_by, f"{path} line {number}")
        curves.append(Curve(label=group_label(config, label_by), task=str(config.get("task")),
                            seed=str(config.get("seed")), source=str(record.get("source") or f"{path}:{number}"),
                            frames=frames, returns=returns, times=times,
                            updates_per_s=None if ups is None else float(ups), config=config))
    return curves


def _run_identity(c: Curve) -> tuple[str, str, str]:
    """The same run read twice (from its folder and from an archive, or from two archives) has the
    same run directory as qsm-train was given it, task and seed."""
    return (str(c.config.get("run_dir") or c.source), c.task, c.seed)


def load_runs(paths: list[Path], label_by: list[str]) -> tuple[list[Curve], list[str]]:
    """Every run below the folders and in the archives (.jsonl files) of ``paths``, each once (the
    copy with the most evaluations), with warnings for runs left out."""
    warnings: list[str] = []
    found: list[Curve] = []
    for path in paths:
        if path.is_file():
            if path.suffix != ".jsonl":
                raise ReportError(f"dirs: {path} is a file but not a run archive ({RUNS_ARCHIVE})")
            found += load_archive(path, label_by)
            continue
        for run_dir in find_run_dirs([path]):
            curve = load_run(run_dir, label_by)
            if curve is None:
                warnings.append(f"{run_dir}: no evaluation yet; left out")
            else:
                found.append(curve)
    kept: dict[tuple[str, str, str], Curve] = {}
    for c in found:
        key = _run_identity(c)
        if key in kept:
            longer, other = (c, kept[key]) if len(c.frames) > len(kept[key].frames) else (kept[key], c)
            warnings.append(f"{other.source}: the same run as {longer.source} (run_dir {key[0]}, seed {key[2]}); "
                            "the copy with more evaluations is used")
            c = longer
        kept[key] = c
    return list(kept.values()), warnings


def load_baseline(path: Path) -> list[Curve]:
    """A baseline CSV (task, frames, return, seed[, method]) as one Curve per (method, task, seed)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ReportError(f"baseline: cannot read {path}: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("task", "frames", "return", "seed") if c not in (reader.fieldnames or [])]
    if missing:
        raise ReportError(f"baseline: {path} has no column {missing[0]!r} (needs task, frames, return, seed[, method])")
    points: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for line, row in enumerate(reader, start=2):
        try:
            xy = (float(row["frames"]), float(row["return"]))
        except (TypeError, ValueError):
            raise ReportError(f"baseline: {path} line {line}: frames and return must be numbers") from None
        method = (row.get("method") or "").strip() or Path(path).stem
        points.setdefault((method, row["task"].strip(), row["seed"].strip()), []).append(xy)
    curves = []
    for (method, task, seed), xy in sorted(points.items()):
        xy.sort()
        curves.append(Curve(label=method, task=task, seed=seed, source=str(path), baseline=True,
                            frames=np.array([p[0] for p in xy]), returns=np.array([p[1] for p in xy])))
    return curves


# --- the report --------------------------------------------------------------------------------
@dataclass
class Report:
    """The computed report: rows of report.csv, the markdown, and what the figures draw."""

    rows: list[dict[str, Any]]
    """report.csv's rows: metric, task, label, kind, budget_frames, n, value, ci_low, ci_high, note."""
    markdown: str
    budgets: list[float]
    """Frames at which returns are compared."""
    tasks: list[str]
    curves: list[Curve]
    """Every run and baseline seed (the figures group them)."""
    iqm: dict[str, list[Estimate | None]]
    """Across-task IQM of return/1000 per label, one per budget (None where the label has no run)."""
    options: ReportOptions
    warnings: list[str]


def fmt_frames(frames: float) -> str:
    """50000 -> '50k', 1500000 -> '1.5M', 750 -> '750', 26666.7 -> '26.7k' (3 significant digits)."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(frames) >= size:
            return f"{frames / size:.3g}{unit}"
    return f"{frames:.3g}"


def _group_key(c: Curve) -> tuple[bool, str]:
    return (c.baseline, c.label)


def _display(label: str, baseline: bool) -> str:
    return f"{label} (baseline)" if baseline else label


def make_report(dirs: list[Path], options: ReportOptions | None = None) -> Report:
    """Find the runs below ``dirs`` and in the run archives among them (and read the baselines) and
    compute the report; write nothing."""
    options = options or ReportOptions()
    label_by = options.label_by or default_label_by(dirs)
    runs, warnings = load_runs(dirs, label_by)
    if not runs:
        raise ReportError(f"dirs: no run directories with evaluations (config.json + eval.csv) or archived runs "
                          f"in {', '.join(map(str, dirs))}")
    baselines = [c for path in options.baselines for c in load_baseline(path)]
    curves = runs + baselines
    budgets = sorted(options.budgets) if options.budgets else [min(c.last_frames for c in runs)]
    tasks = sorted({c.task for c in curves if not c.baseline or c.task in {r.task for r in runs}})
    groups: dict[tuple[bool, str], dict[str, list[Curve]]] = {}
    for c in curves:
        groups.setdefault(_group_key(c), {}).setdefault(c.task, []).append(c)
    keys = sorted(groups)
    warnings += _mixed_config_warnings(groups, label_by)
    stat = dict(reps=options.reps, confidence=options.confidence, seed=options.seed)
    rows: list[dict[str, Any]] = []

    def add(metric: str, task: str, key: tuple[bool, str], budget: float | None, est: Estimate, note: str = "") -> None:
        rows.append({"metric": metric, "task": task, "label": key[1], "kind": "baseline" if key[0] else "run",
                     "budget_frames": "" if budget is None else int(budget), "n": est.n,
                     "value": "" if est.n == 0 else round(est.value, 6),
                     "ci_low": "" if est.low is None else round(est.low, 6),
                     "ci_high": "" if est.high is None else round(est.high, 6), "note": note})

    pct = f"{options.confidence:.0%}"
    md = ["# Learning report", ""]
    md.append(f"{len(runs)} runs from {', '.join(str(d) for d in dirs)}"
              + (f"; baselines from {', '.join(str(p) for p in options.baselines)}" if options.baselines else "")
              + f". Groups by {', '.join(label_by)} and task.")
    md.append("")
    md.append("**Frames** are the task's own control steps (policy steps x action repeat), on every axis and in every "
              "table. A return is a run's mean eval return; at a budget each run contributes its latest evaluation at "
              "or before the budget, and a run that has not reached the budget is left out of that figure. "
              f"Intervals: {pct} percentile bootstrap over runs (rliable's stratified bootstrap, {options.reps} "
              "resamples); n counts the runs behind each figure.")
    md.append("")

    # Across tasks: IQM of return/1000 per label and budget.
    md += ["## Across tasks: IQM of return/1000", "",
           "| label | " + " | ".join(f"{fmt_frames(b)} frames" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
    iqm_points: dict[str, list[Estimate | None]] = {}
    for key in keys:
        cells, ests = [], []
        for b in budgets:
            per_task = [np.array([c.returns[c.index_at(b)] / SCORE_SCALE for c in groups[key].get(t, [])
                                  if c.index_at(b) is not None]) for t in tasks]
            have = [t for t, s in zip(tasks, per_task) if len(s)]
            est = iqm_ci([s for s in per_task if len(s)], **stat)
            note = f"{len(have)} of {len(tasks)} tasks"
            cells.append(est.cell(3, f", {note}") if est.n else "- (n=0)")
            ests.append(est if est.n else None)
            add("iqm_return/1000", "all", key, b, est, note)
        iqm_points[_display(key[1], key[0])] = ests
        md.append(f"| {_display(key[1], key[0])} | " + " | ".join(cells) + " |")
    md.append("")

    for task in tasks:
        md += [f"## {task}", ""]
        header = ["label", "runs"] + [f"return at {fmt_frames(b)} frames; wall time" for b in budgets]
        if options.target_return is not None:
            header.append(f"frames to return {options.target_return:g}")
        header.append("updates/s")
        md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in keys:
            runs_here = groups[key].get(task, [])
            if not runs_here:
                continue
            cells = [_display(key[1], key[0]), str(len(runs_here))]
            for b in budgets:
                reached = [c for c in runs_here if c.index_at(b) is not None]
                est = mean_ci([c.returns[c.index_at(b)] for c in reached], **stat)
                add("return", task, key, b, est)
                times = [c.times[c.index_at(b)] for c in reached if c.times is not None]
                wall = f"; {np.mean(times):.0f} s" if times else ""
                if times:
                    add("wall_time_s", task, key, b, Estimate(float(np.mean(times)), None, None, len(times)))
                cells.append(est.cell(1) + wall)
            if options.target_return is not None:
                hits = [c.frames_to(options.target_return) for c in runs_here]
                got = [h for h in hits if h is not None]
                note = f"{len(got)} of {len(hits)} runs reached it"
                est = Estimate(float(np.mean(got)), None, None, len(got)) if got else Estimate(math.nan, None, None, 0)
                add(f"frames_to_return>={options.target_return:g}", task, key, None, est, note)
                cells.append(f"{fmt_frames(est.value)} ({note})" if got else f"not reached (0 of {len(hits)} runs)")
            rates = [c.updates_per_s for c in runs_here if c.updates_per_s is not None]
            if rates:
                add("updates_per_s", task, key, None, Estimate(float(np.mean(rates)), None, None, len(rates)))
            cells.append(f"{np.mean(rates):.1f}" if rates else "-")
            md.append("| " + " | ".join(cells) + " |")
        md.append("")

    md += ["## Figures", "", "![learning curves](curves.png)", "", "![IQM](iqm.png)", "", "![performance profile](profile.png)", ""]
    if warnings:
        md += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    return Report(rows=rows, markdown="\n".join(md), budgets=budgets, tasks=tasks, curves=curves, iqm=iqm_points,
                  options=options, warnings=warnings)


def _mixed_config_warnings(groups: dict[tuple[bool, str], dict[str, list[Curve]]], label_by: list[str]) -> list[str]:
    out = []
    for (baseline, label), by_task in groups.items():
        if baseline:
            continue
        for task, members in by_task.items():
            names = sorted({k for c in members for k in c.config} - SAME_GROUP_FIELDS_IGNORED - set(label_by))
            differ = [k for k in names if len({json.dumps(c.config.get(k)) for c in members}) > 1]
            if differ:
                out.append(f"group {label!r} on {task} mixes runs that differ in {', '.join(differ)}: "
                           f"compare them with --label-by {' '.join(label_by + differ)}")
    return out


# --- output ------------------------------------------------------------------------------------
def write_report(report: Report, out_dir: Path) -> list[Path]:
    """Write report.md, report.csv, the figures and the run archive into ``out_dir`` (each file
    atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["metric", "task", "label", "kind", "budget_frames", "n", "value", "ci_low", "ci_high", "note"]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(report.rows)

    atomic_write_text(out_dir / "report.md", report.markdown)
    atomic_write(out_dir / "report.csv", write_csv)
    runs = sorted((c for c in report.curves if not c.baseline), key=lambda c: (c.task, c.label, c.seed, c.source))
    atomic_write_text(out_dir / RUNS_ARCHIVE, "".join(json.dumps(archive_record(c)) + "\n" for c in runs))
    _plot_curves(report, out_dir / "curves.png")
    _plot_iqm(report, out_dir / "iqm.png")
    _plot_profile(report, out_dir / "profile.png")
    return [out_dir / name for name in REPORT_FILES]


def _colors(report: Report) -> dict[tuple[bool, str], Any]:
    import matplotlib.pyplot as plt

    keys = sorted({_group_key(c) for c in report.curves})
    cycle = plt.get_cmap("tab10")
    return {k: cycle(i % 10) for i, k in enumerate(keys)}


def _plot_curves(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options, tasks, colors = report.options, report.tasks, _colors(report)
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 5.5 * nrows), dpi=100, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        members: dict[tuple[bool, str], list[Curve]] = {}
        for c in report.curves:
            if c.task == task:
                members.setdefault(_group_key(c), []).append(c)
        for key in sorted(members):
            group = members[key]
            end = min(c.last_frames for c in group)
            grid = np.unique(np.concatenate([c.frames[c.frames <= end] for c in group]))
            matrix = np.stack([np.interp(grid, c.frames, c.returns) for c in group])
            mean, low, high = curve_band(matrix, options.reps, options.confidence, options.seed)
            style = ("--o" if len(grid) == 1 else "--") if key[0] else "-"  # a baseline of one point: a marker
            label = textwrap.fill(f"{_display(key[1], key[0])} (n={len(group)})", 60)  # long --label-by labels
            ax.plot(grid, mean, style, color=colors[key], label=label)
            if low is not None:
                ax.fill_between(grid, low, high, color=colors[key], alpha=0.2, linewidth=0)
        for b in report.budgets:
            ax.axvline(b, color="gray", linestyle=":", linewidth=0.8)
        ax.set(title=task, xlabel="frames", ylabel="eval return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15))  # below: the curves stay visible
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle(f"Eval return vs frames: mean over runs, {options.confidence:.0%} bootstrap CI")
    fig.tight_layout()
    atomic_write(path, fig.savefig)
    plt.close(fig)


def _plot_iqm(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report.iqm
    labels = list(points)
    colors = {_display(k[1], k[0]): c for k, c in _colors(report).items()}
    fig, axes = plt.subplots(1, len(report.budgets), figsize=(4.5 * len(report.budgets), 0.6 * len(labels) + 1.6),
                             dpi=100, squeeze=False, sharey=True)
    for ax, (i, budget) in zip(axes.flat, enumerate(report.budgets)):
        if all(points[label][i] is None for label in labels):
            ax.text(0.5, 0.5, "no run reached this budget", ha="center", va="center", transform=ax.transAxes)
        for y, label in enumerate(labels):
            est = points[label][i]
            if est is None:
                continue
            if est.low is not None:
                ax.plot([est.low, est.high], [y, y], color=colors[label], linewidth=6, alpha=0.4, solid_capstyle="butt")
            ax.plot([est.value], [y], "|", color=colors[label], markersize=16, markeredgewidth=2)
            ax.annotate(f"n={est.n}", (est.value, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8)
        ax.set(title=f"{fmt_frames(budget)} frames", xlabel="IQM of return/1000", xlim=(-0.02, 1.02),
               ylim=(-0.7, len(labels) - 0.3))
        ax.set_yticks(range(len(labels)), labels)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].invert_yaxis()  # the first label on top (the y axis is shared)
    fig.tight_layout()
    atomic_write(path, fig.savefig)
    plt.close(fig)


def _plot_profile(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    options, tasks = report.options, report.tasks
    reached = [b for b in report.budgets if any(c.index_at(b) is not None for c in report.curves)]
    budget = reached[-1] if reached else report.budgets[-1]  # the last budget that any run reached
    taus = np.linspace(0.0, 1.0, 41)
    profiles, cis, colors = {}, {}, {}
    for key, color in _colors(report).items():
        per_task = [np.array([c.returns[c.index_at(budget)] / SCORE_SCALE for c in report.curves
                              if _group_key(c) == key and c.task == t and c.index_at(budget) is not None]) for t in tasks]
        per_task = [s for s in per_task if len(s)]
        if not per_task:
            continue
        label = _display(key[1], key[0])
        profiles[label], band = score_profile(per_task, taus, options.reps, options.confidence, options.seed)
        cis[label] = band if band is not None else np.stack([profiles[label], profiles[label]])
        colors[label] = color
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if profiles:
        plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=cis, colors=colors, ax=ax,
                                             xlabel=r"return/1000 ($\tau$)", ylabel=r"fraction of runs with return/1000 > $\tau$")
        ax.legend(fontsize="small", loc="lower left")
    else:
        ax.text(0.5, 0.5, "no run reached this budget", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Performance profile at {fmt_frames(budget)} frames (all tasks)")
    fig.tight_layout()
    atomic_write(path, fig.savefig)
    plt.close(fig)
