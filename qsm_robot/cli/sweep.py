"""``qsm-sweep``: a grid of qsm-train runs on Ray Tune, and a learning report with intervals.

    qsm-sweep run SWEEP_DIR --tasks cartpole-swingup walker-walk --presets fast --seeds 0 1 2 --steps 50000
    qsm-sweep run SWEEP_DIR --file sweep.yaml [--cpus-per-trial 2] [--gpus-per-trial 0.25] [--address auto]
    qsm-sweep run --resume SWEEP_DIR          (or the same command again: finished trials are skipped)
    qsm-sweep report DIR [DIR ...] [--out OUT] [--budgets 50k 100k] [--target-return 600] [--baseline CSV]

Each trial is an ordinary qsm-train run directory, SWEEP_DIR/trials/<task>__<preset>__seed<seed>[__<grid
values>]. Exit codes: 0 done, 1 some trials not finished (run the command again), 2 bad input
(found before any trial starts), 130 interrupted. docs/SWEEP.md has the details.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qsm_robot.config import PRESETS

PROG = "qsm-sweep"


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def parse_frames(text: str) -> float:
    """'50000', '50k', '1.5M' -> frames."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 1e3, "m": 1e6}.get(t[-1:], 1.0)
    try:
        value = float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a frame count: {text!r} (e.g. 50000, 50k, 1.5M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a budget must be > 0 frames, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a grid of qsm-train runs on Ray Tune (run), and report them with "
        "confidence intervals (report). Every frame count is in frames: policy steps x action repeat.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,report}")

    run = sub.add_parser(
        "run", help="run (or continue) a sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every trial of a sweep (tasks x presets x seeds x grid) on Ray Tune. Each trial is an\n"
        "ordinary qsm-train run directory under SWEEP_DIR/trials/; a trial that dies is retried from its latest\n"
        "checkpoint, and running the same command again (or --resume) continues an interrupted sweep,\n"
        "skipping finished trials.",
        epilog="examples:\n"
        "  qsm-sweep run sweeps/fast --tasks cartpole-swingup walker-walk --presets fast --seeds 0 1 2 --steps 50000\n"
        "  qsm-sweep run sweeps/mq --file sweep.yaml --grid q_grad_scale=30,50,100\n"
        "  qsm-sweep run --resume sweeps/fast --address ray://head:10001 --gpus-per-trial 0.25\n"
        "sweep file (YAML or JSON): keys tasks, presets, seeds, set {FIELD: VALUE}, grid {FIELD: [VALUES]},\n"
        "resources {cpus_per_trial, gpus_per_trial, max_failures, max_concurrent}; flags override it.")
    run.add_argument("sweep_dir", nargs="?", type=Path, metavar="SWEEP_DIR", help="the sweep's folder")
    run.add_argument("--resume", type=Path, metavar="SWEEP_DIR", help="continue the sweep in SWEEP_DIR (its sweep.json)")
    spec = run.add_argument_group("the grid (stored in SWEEP_DIR/sweep.json)")
    spec.add_argument("--file", type=Path, help="sweep file, YAML (.yaml/.yml) or JSON")
    spec.add_argument("--tasks", nargs="+", metavar="TASK", help="dm_control tasks as domain-task")
    spec.add_argument("--presets", nargs="+", metavar="PRESET", help=f"presets ({', '.join(PRESETS)}); default reference")
    spec.add_argument("--seeds", nargs="+", metavar="SEED", help="seeds; default 0")
    spec.add_argument("--steps", metavar="N", help="policy steps per trial (the same as --set steps=N)")
    spec.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a TrainConfig field for every trial (repeatable), e.g. --set eval_every=5000")
    spec.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                      help="a TrainConfig field to sweep (repeatable): one trial per combination")
    res = run.add_argument_group("resources (may change when a sweep is continued)")
    res.add_argument("--cpus-per-trial", type=float, metavar="C", help="CPUs per trial, fractions allowed; its threads follow (default 1)")
    res.add_argument("--gpus-per-trial", type=float, metavar="G", help="GPUs per trial, fractions allowed (0.25: four per GPU); default 0")
    res.add_argument("--max-failures", type=int, metavar="N", help="retries of a dead trial, each from its checkpoint (default 3; -1: no limit)")
    res.add_argument("--max-concurrent", type=int, metavar="N", help="trials at once (default 0: as many as resources allow)")
    cluster = run.add_argument_group("Ray")
    cluster.add_argument("--address", metavar="ADDR", help="join this Ray cluster (auto, or ray://HOST:PORT) instead of starting a local Ray")
    cluster.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the local Ray (default: this process's CPUs)")
    cluster.add_argument("--num-gpus", type=int, metavar="N", help="GPUs of the local Ray (default: those torch sees)")
    cluster.add_argument("--progress-every", type=float, metavar="S",
                     help="seconds between status lines (default 1 on a terminal, 60 otherwise)")

    rep = sub.add_parser(
        "report", help="learning report over folders of run directories",
        description="Report every run directory (config.json + eval.csv) below DIRs: eval return per task at each "
        "budget (mean, 95% CI, n runs), frames to a target return, wall time and updates/s, IQM of return/1000 "
        "across tasks, learning curves with CI bands and a performance profile (rliable statistics). Writes "
        "report.md, report.csv, curves.png, iqm.png, profile.png and runs.jsonl (the run archive: commit it, and a "
        "later report can be rebuilt or extended from it when the run folders are gone).")
    rep.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                     help="sweep folders, run folders, folders of runs, or run archives (an earlier report's runs.jsonl)")
    rep.add_argument("--out", type=Path, help="output folder (default: DIR when one is given; an archive's folder)")
    rep.add_argument("--budgets", nargs="+", type=parse_frames, metavar="FRAMES",
                     help="frame budgets, e.g. 50k 100k (default: the largest frame count every run reached)")
    rep.add_argument("--target-return", type=float, metavar="R", help="also report the frames to a first eval return >= R")
    rep.add_argument("--baseline", action="append", default=[], type=Path, metavar="CSV",
                     help="other methods' curves: CSV with task,frames,return,seed[,method] (repeatable)")
    rep.add_argument("--label-by", nargs="+", metavar="FIELD",
                     help="config.json fields that name a group (default: preset, plus a sweep's grid fields)")
    rep.add_argument("--reps", type=int, default=2000, help="bootstrap resamples per interval (default 2000)")
    rep.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from qsm_robot.sweep.grid import (
        SweepError, SweepSpec, check_sweep_dir, expand, load_sweep_file, make_resources, normalize_spec,
        parse_assignment, read_sweep_json, write_sweep_json,
    )

    spec_flags = [args.file, args.tasks, args.presets, args.seeds, args.steps, args.set, args.grid]
    spec_given = any(x not in (None, []) for x in spec_flags)
    try:
        if args.resume and args.sweep_dir:
            raise SweepError("sweep_dir: give SWEEP_DIR or --resume SWEEP_DIR, not both")
        sweep_dir = args.resume or args.sweep_dir
        if sweep_dir is None:
            raise SweepError("sweep_dir: give the sweep's folder (SWEEP_DIR), or --resume SWEEP_DIR")
        stored = read_sweep_json(sweep_dir)
        if args.resume and stored is None:
            raise SweepError(f"resume: {sweep_dir} holds no sweep.json (not a sweep folder)")
        if args.resume and spec_given:
            raise SweepError("resume: the grid comes from sweep.json; with --resume give only resources and Ray flags")
        resource_values = dict(stored["resources"]) if stored else {}
        if stored and not spec_given:
            try:
                spec = SweepSpec(**stored["spec"])
            except TypeError as exc:
                raise SweepError(f"sweep: {sweep_dir}/sweep.json is not a sweep this version reads: {exc}") from None
        else:
            fields, file_resources = load_sweep_file(args.file) if args.file else ({}, {})
            resource_values.update(file_resources)
            spec = SweepSpec(**{k: v for k, v in fields.items()})
            spec.set, spec.grid = dict(spec.set or {}), dict(spec.grid or {})
            if args.tasks:
                spec.tasks = args.tasks
            if args.presets:
                spec.presets = args.presets
            if args.seeds:
                spec.seeds = args.seeds
            if args.steps is not None:
                spec.set["steps"] = args.steps
            for text in args.set:
                name, value = parse_assignment(text, "--set")
                spec.set[name] = value
            for text in args.grid:
                name, values = parse_assignment(text, "--grid")
                spec.grid[name] = [v.strip() for v in values.split(",") if v.strip()]
            if not spec.tasks:
                raise SweepError("tasks: a new sweep needs tasks (--tasks or 'tasks' in --file)")
        flags = {"cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial,
                 "max_failures": args.max_failures, "max_concurrent": args.max_concurrent}
        resource_values.update({k: v for k, v in flags.items() if v is not None})
        resources = make_resources(resource_values)
        spec = normalize_spec(spec)
        trials = expand(spec, sweep_dir)
        check_sweep_dir(sweep_dir, spec)
        write_sweep_json(sweep_dir, spec, resources, trials)

        from qsm_robot.sweep.runner import run_sweep

        return run_sweep(sweep_dir, trials, resources, address=args.address, num_cpus=args.num_cpus,
                         num_gpus=args.num_gpus, progress_every_s=args.progress_every)
    except SweepError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; continue with: {PROG} run --resume {sweep_dir}", file=sys.stderr)
        return 130


def _report(args: argparse.Namespace) -> int:
    from qsm_robot.sweep.report import ReportError, ReportOptions, make_report, write_report

    if args.out is None and len(args.dirs) > 1:
        return _fail("out: with several DIRs, say where the report goes (--out OUT_DIR)")
    if args.reps < 100:
        return _fail(f"reps: at least 100 bootstrap resamples, got {args.reps}")
    out = args.out or (args.dirs[0].parent if args.dirs[0].is_file() else args.dirs[0])
    options = ReportOptions(budgets=args.budgets, target_return=args.target_return, label_by=args.label_by,
                            baselines=args.baseline, reps=args.reps, seed=args.seed)
    try:
        report = make_report(args.dirs, options)
    except ReportError as exc:
        return _fail(str(exc))
    files = write_report(report, out)
    print(report.markdown.split("## Figures")[0].rstrip())
    print(f"\n{PROG}: wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args) if args.command == "run" else _report(args)


if __name__ == "__main__":
    sys.exit(main())
