"""DDPM noise schedules (``beta_t`` for t = 1..T) and the quantities the sampler uses."""

from __future__ import annotations

import math

import torch

from qsm_robot.qsm.hyperparams import SCHEDULES


def make_betas(name: str, T: int) -> torch.Tensor:
    """``beta_1..beta_T`` (float64) of schedule ``name``; index 0 is the first noising step."""
    if T < 1:
        raise ValueError(f"diffusion steps T must be >= 1, got {T}")
    if name == "vp":
        b_min, b_max = 0.1, 10.0
        t = torch.arange(1, T + 1, dtype=torch.float64)
        return 1.0 - torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)
    if name == "linear":
        return torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        x = torch.linspace(0, T, T + 1, dtype=torch.float64)
        f = torch.cos(((x / T) + s) / (1 + s) * math.pi / 2) ** 2
        alpha_hat = f / f[0]
        return torch.clip(1 - alpha_hat[1:] / alpha_hat[:-1], 0, 0.999)
    raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")


class DiffusionSchedule(torch.nn.Module):
    """beta, alpha = 1 - beta and alpha_hat = cumprod(alpha), as float32 buffers of length T.

    Index ``t`` (0-based) is the card's step t+1: ``alpha_hat[0]`` is the least noised level.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_hats: torch.Tensor

    def __init__(self, name: str, T: int):
        super().__init__()
        betas = make_betas(name, T)
        alphas = 1.0 - betas
        self.name, self.T = name, T
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas", alphas.float())
        alpha_hats = torch.cumprod(alphas, 0)
        self.register_buffer("alpha_hats", alpha_hats.float())
        # The reverse step's constants as Python floats (computed in float64): the sampler then
        # launches no tensor ops for them, and an exported graph holds them as constants.
        self.eps_coef = (betas / torch.sqrt(1 - alpha_hats)).tolist()
        self.inv_sqrt_alpha = (1 / torch.sqrt(alphas)).tolist()
        self.sigma = torch.sqrt(betas).tolist()
