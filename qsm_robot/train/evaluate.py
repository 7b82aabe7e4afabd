"""Evaluation: episodes of the plain diffusion sample, run side by side in separate envs."""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np
import torch


def evaluate(
    policy: Callable[[torch.Tensor], torch.Tensor], envs: list[gym.Env], device: torch.device
) -> list[float]:
    """One episode in each env, the policy acting on all unfinished envs as one batch.

    ``policy`` maps obs [N, obs_dim] to actions [N, act_dim] in [-1, 1]. Returns the returns.
    """
    obs = [env.reset()[0] for env in envs]
    returns = [0.0] * len(envs)
    live = list(range(len(envs)))
    while live:
        batch = torch.as_tensor(np.stack([obs[i] for i in live]), device=device)
        actions = policy(batch).cpu().numpy()
        still = []
        for i, action in zip(live, actions):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += float(reward)
            if not (terminated or truncated):
                still.append(i)
        live = still
    return returns
