"""Uniform replay buffer kept as tensors on the training device (no host copy per update), and
the n-step returns that feed it."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

FIELDS = ("obs", "action", "reward", "next_obs", "mask")


class ReplayBuffer:
    """A ring buffer of (s, a, r, s', mask) transitions.

    ``mask`` is 0 only when s' is a true terminal state and 1 otherwise (a time-limit truncation
    keeps mask 1: the episode would have continued). For an n-step transition (:class:`NStepReturns`)
    r is the discounted sum of k <= n rewards and s' the state k steps on, and a non-terminal mask
    is gamma^(k-1), so that the card's target y = r + gamma * mask * Q(s', a') discounts by gamma^k.
    """

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.size = self.ptr = 0
        shapes = {"obs": (obs_dim,), "action": (act_dim,), "reward": (), "next_obs": (obs_dim,), "mask": ()}
        self.data = {k: torch.zeros((capacity, *s), dtype=torch.float32, device=device) for k, s in shapes.items()}

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, terminated: bool,
            bootstrap: float = 1.0) -> None:
        """Store one transition; its mask is 0 if ``terminated``, else ``bootstrap``."""
        i = self.ptr
        for key, value in (("obs", obs), ("action", action), ("next_obs", next_obs)):
            self.data[key][i] = torch.as_tensor(value, dtype=torch.float32)
        self.data["reward"][i] = float(reward)
        self.data["mask"][i] = 0.0 if terminated else float(bootstrap)
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


class NStepReturns:
    """Turns the env's one-step transitions into n-step ones as they arrive.

    ``push`` takes (s_t, a_t, r_t) and the step's outcome and returns the transitions now complete,
    each as (s, a, R, s', terminated, bootstrap) for :meth:`ReplayBuffer.add`: R = sum_i gamma^i r_(t+i)
    over k = n rewards (fewer at an episode's end, where every pending start is flushed), s' the state
    after the last of them and bootstrap = gamma^(k-1). With n = 1 it passes each transition through
    unchanged (R = r, bootstrap 1).
    """

    def __init__(self, n: int, gamma: float):
        if n < 1:
            raise ValueError(f"n-step returns need n >= 1, got {n}")
        self.n, self.gamma = n, gamma
        self.pending: deque[tuple[np.ndarray, np.ndarray, float]] = deque()

    def push(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray,
             terminated: bool, truncated: bool) -> list[tuple]:
        self.pending.append((obs, action, float(reward)))
        done: list[tuple] = []
        if terminated or truncated:
            while self.pending:
                done.append(self._pop(next_obs, terminated))
        elif len(self.pending) == self.n:
            done.append(self._pop(next_obs, False))
        return done

    def _pop(self, next_obs: np.ndarray, terminated: bool) -> tuple:
        k = len(self.pending)
        ret = 0.0
        for i, (_, _, r) in enumerate(self.pending):
            ret += self.gamma**i * r
        obs, action, _ = self.pending.popleft()
        return obs, action, ret, next_obs, terminated, self.gamma ** (k - 1)

    def state_dict(self) -> dict:
        """The pending starts, for a checkpoint (tensors, so they go to safetensors)."""
        return {
            "obs": [torch.as_tensor(o) for o, _, _ in self.pending],
            "action": [torch.as_tensor(a) for _, a, _ in self.pending],
            "reward": [r for _, _, r in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.pending = deque(
            (o.numpy(), a.numpy(), float(r)) for o, a, r in zip(state["obs"], state["action"], state["reward"])
        )
