"""Uniform replay buffer kept as tensors on the training device (no host copy per update)."""

from __future__ import annotations

import numpy as np
import torch

FIELDS = ("obs", "action", "reward", "next_obs", "mask")


class ReplayBuffer:
    """A ring buffer of (s, a, r, s', mask) transitions.

    ``mask`` is 0 only when s' is a true terminal state and 1 otherwise (a time-limit truncation
    keeps mask 1: the episode would have continued).
    """

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.size = self.ptr = 0
        shapes = {"obs": (obs_dim,), "action": (act_dim,), "reward": (), "next_obs": (obs_dim,), "mask": ()}
        self.data = {k: torch.zeros((capacity, *s), dtype=torch.float32, device=device) for k, s in shapes.items()}

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, terminated: bool) -> None:
        i = self.ptr
        for key, value in (("obs", obs), ("action", action), ("next_obs", next_obs)):
            self.data[key][i] = torch.as_tensor(value, dtype=torch.float32)
        self.data["reward"][i] = float(reward)
        self.data["mask"][i] = 0.0 if terminated else 1.0
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A uniform batch; indices come from the seeded numpy ``rng``."""
        idx = torch.from_numpy(rng.integers(0, self.size, size=batch_size)).to(self.device)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The filled part only, on the CPU."""
        state: dict[str, torch.Tensor | int] = {k: v[: self.size].cpu() for k, v in self.data.items()}
        state.update(ptr=self.ptr, size=self.size)
        return state

    def load_state_dict(self, state: dict) -> None:
        size = int(state["size"])
        if size > self.capacity:
            raise ValueError(f"replay state holds {size} transitions, capacity is {self.capacity}")
        for k in FIELDS:
            self.data[k][:size] = state[k].to(self.device)
        self.size, self.ptr = size, int(state["ptr"])
