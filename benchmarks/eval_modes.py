"""Evaluation modes benchmark: each run's final policy as a plain diffusion sample, as the
chain's zero-noise decode and as the best of N samples under the run's critics, on the same episodes.

    python -m benchmarks.eval_modes RUN_DIR [RUN_DIR ...] [--episodes 20] [--action-samples 16]

The returns in eval.csv (and so in every qsm-sweep report) are those of the run's evaluation
policy: plain diffusion samples, or the best of N under the critics where the run sets
``eval_action_samples``. The modern actor-critics that the learning targets come from
(SAC-family, TD-MPC2) evaluate a deterministic action (their policy's mean). A diffusion
policy's counterpart is the zero-noise decode of its chain (``DiffusionPolicy.decode``: a_T = 0
and no noise between steps). Q-selected sampling (``qsm_robot.qsm.selection``: N chain draws,
the one of highest mean critic value) narrows the policy towards the critic's greedy action.
This script measures the three on the final checkpoint of each run, on the same ``--episodes``
fresh episodes per run (their seeds depend on the run's seed only, not on the mode), and prints a
table per run, a table per task (mean over seeds with its 95% bootstrap interval, the report's
``mean_ci``) and the IQM of return/1000 over all runs with its 95% bootstrap interval (the
report's ``iqm_ci``). It writes benchmarks/results/eval_modes_<time>.csv.
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

MODES = ("sample", "zero_noise", "selected")
EPISODE_SEED = 20_261_202
"""Mixed with the run's seed into the benchmark episodes' seeds: other episodes than training's."""


def evaluate(run: Path, episodes: int, samples: int) -> dict:
    """One run's final policy in each mode (``selected``: best of ``samples``) on the same fresh episodes."""
    import torch

    from qsm_robot.envs.dmc import make_env
    from qsm_robot.envs.rollout import run_episodes
    from qsm_robot.qsm.policy import load_policy
    from qsm_robot.qsm.selection import QSelectedPolicy, load_critic
    from qsm_robot.train.loop import SATURATED_AT
    from qsm_robot.train.run_log import read_csv

    config = json.loads((run / "config.json").read_text())
    policy = load_policy(run)
    selected = QSelectedPolicy(policy, load_critic(run), samples)
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
            if mode == "zero_noise":
                action = policy.decode(obs_t).numpy()
            else:
                action = (policy if mode == "sample" else selected).act(obs_t, generator).numpy()
            at_bound[0] += int((np.abs(action) >= SATURATED_AT).sum())
            at_bound[1] += action.size
            return action

        envs = [make_env(config["task"], seed=int(s), action_repeat=policy.spec.action_repeat) for s in seeds]
        returns = run_episodes(act, envs)
        row[f"{mode}_mean"] = round(float(np.mean(returns)), 1)
        row[f"{mode}_std"] = round(float(np.std(returns)), 1)
        row[f"{mode}_saturated"] = round(at_bound[0] / max(at_bound[1], 1), 3)
    row["zero_noise_gain"] = round(row["zero_noise_mean"] - row["sample_mean"], 1)
    row["selected_gain"] = round(row["selected_mean"] - row["sample_mean"], 1)
    row["action_samples"] = samples
    return row


def with_interval(est, digits: int = 1) -> str:
    """An estimate as "value [low, high]" (its 95% bootstrap interval; the value alone for one run)."""
    interval = "" if est.low is None else f" [{est.low:.{digits}f}, {est.high:.{digits}f}]"
    return f"{est.value:.{digits}f}{interval}"


def main(argv: list[str] | None = None) -> int:
    from qsm_robot.sweep.report import iqm_ci, mean_ci

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="qsm-train run directories")
    p.add_argument("--episodes", type=int, default=20, help="fresh episodes per run and mode")
    p.add_argument("--action-samples", type=int, default=16, help="N of the selected mode: the best of N samples")
    a = p.parse_args(argv)
    missing = [str(r) for r in a.runs if not (r / "config.json").is_file()]
    if missing:
        p.error(f"not run directories (no config.json): {', '.join(missing)}")
    for name in ("episodes", "action_samples"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    import torch
    torch.set_num_threads(1)
    rows = []
    for run in a.runs:
        rows.append(evaluate(run, a.episodes, a.action_samples))
        print(f"{run}: " + ", ".join(f"{m} {rows[-1][f'{m}_mean']}" for m in MODES), flush=True)
    print_table(rows)
    tasks = sorted({r["task"] for r in rows})
    summary = []
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        final = [r["train_final_eval"] for r in mine]
        summary.append({"task": task, "runs": len(mine), "frames": "/".join(str(f) for f in sorted({r["frames"] for r in mine})),
                        "train_final_eval": None if None in final else round(float(np.mean(final)), 1),
                        **{f"{m}_mean": with_interval(mean_ci([r[f"{m}_mean"] for r in mine])) for m in MODES}})
    print()
    print_table(summary)
    for m in MODES:
        est = iqm_ci([np.array([r[f"{m}_mean"] for r in rows if r["task"] == t]) / 1000 for t in tasks])
        print(f"IQM return/1000, {m}, {est.n} runs: {with_interval(est, 3)}")
    save_rows("eval_modes", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
