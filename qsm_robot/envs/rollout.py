"""Policy episodes in several envs side by side, one batched policy call per step.

Used by training (evaluation) and by export (teacher states, return retention).
"""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np


def run_episodes(
    policy: Callable[[np.ndarray], np.ndarray],
    envs: list[gym.Env],
    record_obs: list[np.ndarray] | None = None,
    max_steps: int | None = None,
) -> list[float]:
    """One episode in each env, the policy acting on all unfinished envs as one batch.

    ``policy`` maps float32 obs [N, obs_dim] to actions [N, act_dim] (in the envs' action
    units). Observations seen are appended to ``record_obs`` when given. ``max_steps``: stop every
    episode after this many policy steps (None: run each to its end). Returns the returns.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    obs = [env.reset()[0] for env in envs]
    returns = [0.0] * len(envs)
    live = list(range(len(envs)))
    steps = 0
    while live and (max_steps is None or steps < max_steps):
        steps += 1
        batch = np.stack([obs[i] for i in live])
        if record_obs is not None:
            record_obs.append(batch)
        actions = np.asarray(policy(batch))
        still = []
        for i, action in zip(live, actions):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += float(reward)
            if not (terminated or truncated):
                still.append(i)
        live = still
    return returns
