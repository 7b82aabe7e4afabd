"""Batch-1 latency of exported ONNX policies, side by side in one run.

    python -m benchmarks.onnx_latency MODEL.onnx [MODEL.onnx ...] [--calls 5000] [--rounds 3]

Each round times every model in turn (the export's own session settings: one intra-op thread,
sequential, full graph optimisation), so a drift of this VM's speed reaches all of them alike;
compare models within one run. Prints p50 / p99 / p99.9 over all rounds and each round's p99, and
writes them to benchmarks/results/onnx_latency_<time>.csv.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python benchmarks/onnx_latency.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, save_rows


def main(argv: list[str] | None = None) -> int:
    from qsm_robot.export.runtime import latency_us, make_session, read_contract

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="ONNX files written by qsm-export")
    p.add_argument("--calls", type=int, default=5000, help="timed calls per model and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each timing every model in turn")
    a = p.parse_args(argv)
    sessions = {m: make_session(m) for m in a.models}
    contracts = {m: read_contract(s) for m, s in sessions.items()}
    times: dict[Path, list[np.ndarray]] = {m: [] for m in a.models}
    for _ in range(a.rounds):
        for m, s in sessions.items():
            c = contracts[m]
            times[m].append(latency_us(s, c.io.obs_dim, tuple(c.noise_shape[1:]), a.calls))
    rows = []
    for m, rounds in times.items():
        t = np.concatenate(rounds)
        rows.append({"model": m.name, "sampler": f"{contracts[m].sampler} K={contracts[m].sampler_steps}",
                     "p50_us": round(float(np.percentile(t, 50)), 1), "p99_us": round(float(np.percentile(t, 99)), 1),
                     "p99.9_us": round(float(np.percentile(t, 99.9)), 1),
                     "p99_per_round_us": " ".join(f"{np.percentile(r, 99):.1f}" for r in rounds)})
    print_table(rows)
    save_rows("onnx_latency", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
