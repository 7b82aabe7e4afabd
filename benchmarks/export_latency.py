"""Export benchmark: batch-1 latency of the torch teacher, the ONNX teacher and ONNX students,
and each student's return retention, for one trained policy.

    python -m benchmarks.export_latency                      # newest reference run of benchmarks/learning.py
    python -m benchmarks.export_latency --run runs/my-run --students 1 2 --calls 10000

Every model is written by the same code path as qsm-export (gates on, with --force so that a
failing gate is reported in the table rather than stopping the benchmark). Prints a table and
writes benchmarks/results/export_*.csv and .png; models go to benchmarks/results/models/.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python benchmarks/export_latency.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_table, write_csv
from qsm_robot.export.exporter import ExportOptions, export_policy
from qsm_robot.export.student import ActuatorPolicy, TeacherSampler
from qsm_robot.qsm.policy import load_policy

OUT = Path(__file__).parent / "results"


def torch_latency_us(module, obs_dim: int, noise_shape: tuple, calls: int, warmup: int = 200) -> np.ndarray:
    obs, noise = torch.randn(1, obs_dim), torch.randn(1, *noise_shape)
    times = np.empty(calls)
    with torch.inference_mode():
        for _ in range(warmup):
            module(obs, noise)
        for i in range(calls):
            t = time.perf_counter_ns()
            module(obs, noise)
            times[i] = time.perf_counter_ns() - t
    return times / 1e3


def newest_reference_run() -> Path:
    runs = sorted((OUT / "runs").glob("cartpole-swingup__reference__seed0__*"))
    if not runs:
        raise SystemExit("no reference run under benchmarks/results/runs: run python -m benchmarks.learning first, or pass --run")
    return runs[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="run or checkpoint directory (default: newest reference benchmark run)")
    p.add_argument("--students", type=int, nargs="+", default=[1, 2], help="student step counts K")
    p.add_argument("--calls", type=int, default=10_000, help="timed batch-1 calls per model")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--distill-iterations", type=int, default=None,
                   help="default: the distillation method's (student.method_default)")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = args.run or newest_reference_run()
    policy = load_policy(run)
    spec = policy.spec
    noise_shape = (spec.diffusion_steps, spec.act_dim)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    rows = []
    lat = torch_latency_us(ActuatorPolicy(TeacherSampler(policy), spec.action_low, spec.action_high).eval(),
                           spec.obs_dim, noise_shape, args.calls)
    rows.append({"model": f"torch eager teacher (T={spec.diffusion_steps})", "steps": spec.diffusion_steps,
                 **{f"p{q}_us": round(float(np.percentile(lat, q)), 1) for q in (50, 99, 99.9)}})
    for teacher, k in [(True, spec.diffusion_steps)] + [(False, k) for k in args.students]:
        name = "teacher" if teacher else f"student-k{k}"
        opts = ExportOptions(out=OUT / "models" / f"{spec.task}-{name}-{stamp}.onnx", teacher=teacher,
                             student_steps=k if not teacher else 1, force=True, latency_calls=args.calls,
                             eval_episodes=args.eval_episodes, distill_iterations=args.distill_iterations)
        report = export_policy(run, opts, log=lambda m: None)
        g = report.gates
        rows.append({
            "model": f"ONNX {name}", "steps": k, **{f"p{q}_us": g["latency"][f"p{q}_us"] for q in (50, 99, 99.9)},
            "retention": None if g["retention"]["retention"] is None else round(g["retention"]["retention"], 3),
            "onnx_return": round(report.student_return_mean, 1), "teacher_return": round(report.teacher_return_mean, 1),
            "parity_max_abs_diff": g["parity"]["max_abs_diff"], "gates_passed": report.passed,
            "distill_s": report.distill_seconds,
        })
    base = rows[0]["p50_us"]
    for r in rows:
        r["speedup_p50_vs_torch"] = round(base / r["p50_us"], 1)

    print(f"policy: {run} (task {spec.task}, step {spec.step}); batch 1, 1 thread, {args.calls} calls each")
    print_table(rows)
    stem = OUT / f"export_{spec.task}_{stamp}"
    write_csv(stem.with_suffix(".csv"), rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    x = np.arange(len(rows))
    for i, q in enumerate((50, 99, 99.9)):
        ax.bar(x + (i - 1) * 0.27, [r[f"p{q}_us"] for r in rows], 0.27, label=f"p{q}")
    ax.set_xticks(x, [r["model"] for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency (us, log)")
    ax.set_title(f"batch-1 policy latency, 1 CPU thread ({spec.task})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"))
    print(f"wrote {stem}.csv and {stem}.png")


if __name__ == "__main__":
    main()
