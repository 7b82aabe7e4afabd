"""Learning benchmark: QSM on a dm_control task, eval return every 5k frames.

    python -m benchmarks.learning --preset reference --seeds 0 1 --steps 50000
    python -m benchmarks.learning --preset fast --seeds 0

Prints a table (eval return at each evaluation, wall time, updates/s, wall time and step at
which the eval return first reached --target) and writes benchmarks/results/learning_*.csv and
.png. Each run is an ordinary qsm-train run directory under benchmarks/results/runs/.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python benchmarks/learning.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import print_table, write_csv
from qsm_robot.config import preset_config
from qsm_robot.train.loop import Trainer, prepare_run_dir
from qsm_robot.train.run_log import read_csv

OUT = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="reference")
    p.add_argument("--task", default="cartpole-swingup")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=50_000, help="frames (policy steps x action repeat)")
    p.add_argument("--learning-starts", type=int, default=10_000, help="random-action frames")
    p.add_argument("--eval-every", type=int, default=5_000, help="frames between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", type=float, default=600.0)
    args = p.parse_args()

    rows = []
    for seed in args.seeds:
        # The preset's action repeat turns environment steps into policy steps (what qsm-train counts).
        repeat = preset_config(args.preset).action_repeat
        cfg = preset_config(
            args.preset, task=args.task, seed=seed, steps=args.steps // repeat,
            learning_starts=args.learning_starts // repeat, eval_every=args.eval_every // repeat,
            eval_episodes=args.eval_episodes, threads=args.threads, device="cpu",
            run_dir=str(OUT / "runs" / f"{args.task}__{args.preset}__seed{seed}__{time.strftime('%Y%m%d-%H%M%S')}"),
        )
        run_dir = prepare_run_dir(cfg)
        result = Trainer(cfg, run_dir).run()
        if result.interrupted is not None:
            raise SystemExit(f"interrupted by signal {result.interrupted}; {run_dir} can be resumed with qsm-train --resume")
        evals = read_csv(run_dir / "eval.csv")
        hit = next((r for r in evals if float(r["return_mean"]) >= args.target), None)
        rows.append({
            "preset": args.preset, "seed": seed, "run_dir": str(run_dir), "wall_s": round(result.wall_s, 1),
            "updates_per_s": round(result.updates_per_s, 1),
            "target_env_step": hit and int(hit["step"]) * repeat, "target_wall_s": hit and float(hit["time_s"]),
            **{f"eval@{int(r['step']) * repeat // 1000}k": round(float(r["return_mean"]), 1) for r in evals},
        })
        print(f"seed {seed} done: final eval {result.final_eval:.1f}, {result.wall_s:.0f} s", file=sys.stderr)

    stem = OUT / f"learning_{args.task}_{args.preset}_{time.strftime('%Y%m%d-%H%M%S')}"
    write_csv(stem.with_suffix(".csv"), rows)
    print_table(rows, [c for c in rows[0] if c != "run_dir"] + [c for c in rows[-1] if c not in rows[0]])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for r in rows:
        evals = read_csv(Path(r["run_dir"]) / "eval.csv")
        ax.plot([int(e["step"]) * repeat for e in evals], [float(e["return_mean"]) for e in evals], "-o", label=f"seed {r['seed']}")
    ax.axhline(args.target, color="gray", ls="--", lw=1)
    ax.set(xlabel="frames (policy steps x action repeat)", ylabel="eval return", title=f"QSM {args.task}, preset {args.preset}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"))
    print(f"wrote {stem}.csv and {stem}.png")


if __name__ == "__main__":
    main()
