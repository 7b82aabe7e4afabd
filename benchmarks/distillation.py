"""Distillation benchmark: each student objective through the whole of qsm-export, side by side.

    python -m benchmarks.distillation RUN_DIR [RUN_DIR ...] [--candidates stepwise:5 regression:1 ...]
                                      [--iterations N]

A candidate is METHOD:K[:WIDTH[:DRAWS]] (distillation method, student steps, student width, samples
per state for ot and energy; defaults 256 and the method's, student.method_default). For every run and candidate it exports a student with ``--force`` (so that every gate is
measured even when one fails) and tabulates the export report: the distribution gate (W1 / range
mean and worst state against the teacher-vs-itself floor, off-support share), return retention,
batch-1 latency (p50 / p99) and distillation time. The models go to
benchmarks/results/distillation-<time>/ with their reports and action plots; the table to
distillation.csv there.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python benchmarks/distillation.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from pathlib import Path

from benchmarks.common import print_table, write_csv

OUT = Path(__file__).resolve().parent / "results"
DEFAULT_CANDIDATES = ("mixture:1", "mixture-last:1", "regression:1", "ot:1", "stepwise:5", "stepwise:2", "l1:1", "energy:1")


def candidate(text: str) -> tuple[str, int, int, int | None]:
    """METHOD:K[:WIDTH[:DRAWS]] -> (method, K, width, draws or None for the method's default)."""
    parts = text.split(":")
    try:
        if not 2 <= len(parts) <= 4:
            raise ValueError
        numbers: list = [int(x) for x in parts[1:]] + [256, None][len(parts) - 2:]
        return parts[0], numbers[0], numbers[1], numbers[2]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a candidate is METHOD:K[:WIDTH[:DRAWS]], e.g. stepwise:5:128 or ot:1:256:64, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    from qsm_robot.export.exporter import ExportOptions, export_policy
    from qsm_robot.export.student import DRAW_METHODS, METHODS, method_default
    from qsm_robot.qsm.policy import load_policy

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="qsm-train run directories (or checkpoints)")
    p.add_argument("--candidates", nargs="+", type=candidate, metavar="METHOD:K[:WIDTH[:DRAWS]]",
                   default=[candidate(c) for c in DEFAULT_CANDIDATES])
    p.add_argument("--iterations", type=int, default=None, help="default: each method's (student.method_default)")
    a = p.parse_args(argv)
    unknown = sorted({c[0] for c in a.candidates} - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    work = OUT / f"distillation-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for run in a.runs:
        task = load_policy(run).spec.task
        for method, steps, width, draws in a.candidates:
            if method not in DRAW_METHODS:
                draws = None  # the method ignores it: the table shows '-'
            elif draws is None:
                draws = method_default(method, "draws")
            iterations = method_default(method, "iterations") if a.iterations is None else a.iterations
            out = work / f"{task}-{method}-k{steps}-w{width}" + (f"-d{draws}" if draws else "") + ".onnx"
            r = export_policy(run, ExportOptions(out=out, force=True, distill_method=method, progress=False,
                                                 distill_iterations=iterations, student_steps=steps,
                                                 student_hidden=width, distill_draws=draws),
                              log=lambda m: None)
            d, lat = r.gates["distribution"], r.gates["latency"]
            rows.append({
                "task": task, "run": str(run), "method": method, "K": steps, "width": width, "draws": draws, "iterations": iterations,
                "w1_mean": round(d["w1_mean"], 3), "floor_w1_mean": round(d["floor_w1_mean"], 3),
                "w1_worst": round(d["w1_worst"], 3), "off_support_pct": round(100 * d["off_support_mean"], 1),
                "gate": "pass" if d["passed"] else "fail",
                "retention_pct": None if r.gates["retention"]["retention"] is None
                else round(100 * r.gates["retention"]["retention"], 1),
                "p50_us": lat["p50_us"], "p99_us": lat["p99_us"], "distill_s": r.distill_seconds,
            })
            print(f"{task} {method} K={steps} width {width}: W1 {d['w1_mean']:.3f} off-support {100 * d['off_support_mean']:.1f}%", flush=True)
    print_table(rows, [c for c in rows[0] if c != "run"])
    write_csv(work / "distillation.csv", rows)
    print(f"wrote {work}/distillation.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
