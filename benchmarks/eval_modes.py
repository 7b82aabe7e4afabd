"""Evaluation modes benchmark: each run's final policy as a plain diffusion sample and as the
chain's zero-noise decode, on the same episodes.

    python -m benchmarks.eval_modes RUN_DIR [RUN_DIR ...] [--episodes 20]

The returns in eval.csv (and so in every qsm-sweep report) are those of plain diffusion samples:
the stochastic policy that qsm-export distils and the robot runs. The modern actor-critics that
the learning targets come from (SAC-family, TD-MPC2) evaluate a deterministic action (their
policy's mean). A diffusion policy's counterpart is the zero-noise decode of its chain
(``DiffusionPolicy.decode``: a_T = 0 and no noise between steps). This script measures both on
the final checkpoint of each run, on the same ``--episodes`` fresh episodes per run (their seeds
depend on the run's seed only, not on the mode), and prints a table per run, a table per task
(mean over seeds) and the IQM of return/1000 over all runs with its 95% bootstrap interval (the
report's own ``iqm_ci``). It writes benchmarks/results/eval_modes_<time>.csv.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python benchmarks/eval_modes.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, save_rows

MODES = ("sample", "zero_noise")
EPISODE_SEED = 20_261_202
"""Mixed with the run's seed into the benchmark episodes' seeds: other episodes than training's."""


def evaluate(run: Path, episodes: int) -> dict:
    """One run's final policy in both modes on the same fresh episodes."""
    import torch

    from qsm_robot.envs.dmc import make_env
    from qsm_robot.envs.rollout import run_episodes
    from qsm_robot.qsm.policy import load_policy
    from qsm_robot.train.loop import SATURATED_AT
    from qsm_robot.train.run_log import read_csv

    config = json.loads((run / "config.json").read_text())
    policy = load_policy(run)
    seeds = np.random.SeedSequence([EPISODE_SEED, int(config["seed"])]).generate_state(episodes)
    row = {"task": config["task"], "preset": config.get("preset"), "seed": config["seed"],
           "frames": policy.spec.step * policy.spec.action_repeat}
    evals = read_csv(run / "eval.csv")
    row["train_final_eval"] = round(float(evals[-1]["return_mean"]), 1) if evals else None
    generator = torch.Generator().manual_seed(int(config["seed"]))
    for mode in MODES:
        at_bound = [0, 0]

        def act(obs: np.ndarray) -> np.ndarray:
            obs_t = torch.as_tensor(obs)
            action = (policy.act(obs_t, generator) if mode == "sample" else policy.decode(obs_t)).numpy()
            at_bound[0] += int((np.abs(action) >= SATURATED_AT).sum())
            at_bound[1] += action.size
            return action

        envs = [make_env(config["task"], seed=int(s), action_repeat=policy.spec.action_repeat) for s in seeds]
        returns = run_episodes(act, envs)
        row[f"{mode}_mean"] = round(float(np.mean(returns)), 1)
        row[f"{mode}_std"] = round(float(np.std(returns)), 1)
        row[f"{mode}_saturated"] = round(at_bound[0] / max(at_bound[1], 1), 3)
    row["gain"] = round(row["zero_noise_mean"] - row["sample_mean"], 1)
    return row


def main(argv: list[str] | None = None) -> int:
    from qsm_robot.sweep.report import iqm_ci

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="qsm-train run directories")
    p.add_argument("--episodes", type=int, default=20, help="fresh episodes per run and mode")
    a = p.parse_args(argv)
    missing = [str(r) for r in a.runs if not (r / "config.json").is_file()]
    if missing:
        p.error(f"not run directories (no config.json): {', '.join(missing)}")
    if a.episodes < 1:
        p.error(f"--episodes must be >= 1, got {a.episodes}")
    import torch
    torch.set_num_threads(1)
    rows = []
    for run in a.runs:
        rows.append(evaluate(run, a.episodes))
        print(f"{run}: sample {rows[-1]['sample_mean']}, zero-noise {rows[-1]['zero_noise_mean']}", flush=True)
    print_table(rows)
    tasks = sorted({r["task"] for r in rows})
    summary = []
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        final = [r["train_final_eval"] for r in mine]
        summary.append({"task": task, "runs": len(mine), "frames": "/".join(str(f) for f in sorted({r["frames"] for r in mine})),
                        "train_final_eval": None if None in final else round(float(np.mean(final)), 1),
                        **{f"{m}_mean": round(float(np.mean([r[f"{m}_mean"] for r in mine])), 1) for m in MODES}})
    print()
    print_table(summary)
    for m in MODES:
        est = iqm_ci([np.array([r[f"{m}_mean"] for r in rows if r["task"] == t]) / 1000 for t in tasks])
        interval = "" if est.low is None else f" [{est.low:.3f}, {est.high:.3f}]"
        print(f"IQM return/1000, {m}, {est.n} runs: {est.value:.3f}{interval}")
    save_rows("eval_modes", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
