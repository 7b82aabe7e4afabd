"""The DDPM reverse chain (card: "Sampler"), with its noise passed in explicitly.

Taking the noise as an argument keeps the chain a pure function of (obs, noise): training and
evaluation draw the noise from a seeded generator, export feeds it as a graph input.
"""

from __future__ import annotations

import torch

from qsm_robot.qsm.networks import Denoiser
from qsm_robot.qsm.schedules import DiffusionSchedule


def ddpm_sample(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    obs: torch.Tensor,
    noise: torch.Tensor,
    temperature: float = 1.0,
    clip: bool = True,
    trajectory: bool = False,
) -> torch.Tensor:
    """Run the T-step reverse chain from t = T-1 down to 0; returns actions in [-1, 1].

    obs: [B, obs_dim]. noise: [B, T, act_dim] standard normal; ``noise[:, 0]`` is a_T and
    ``noise[:, k]`` (k >= 1) is the z added at step t = T - k. With ``trajectory`` it returns
    the whole chain [B, T+1, act_dim]: a_T, then a after each step (the last is the action).
    """
    T = schedule.T
    if noise.shape != (obs.shape[0], T, denoiser.act_dim):
        raise ValueError(f"noise must be [B, T={T}, act_dim={denoiser.act_dim}], got {tuple(noise.shape)}")
    obs_code = denoiser.encode_obs(obs)  # the state is projected once for all T steps
    time_codes = denoiser.encode_time(torch.arange(T, device=obs.device))  # [T, hidden]
    a = noise[:, 0]
    chain = [a] if trajectory else None  # kept only when asked: sampling in training needs the action alone
    for t in range(T - 1, -1, -1):
        a = reverse_mean(schedule, t, a, denoiser.denoise(obs_code, a, time_codes[t]))
        if t > 0:  # a <- a + sqrt(beta_t) * temperature * z
            a = a + (schedule.sigma[t] * temperature) * noise[:, T - t]
        if clip or t == 0:
            a = a.clamp(-1.0, 1.0)
        if chain is not None:
            chain.append(a)
    return a if chain is None else torch.stack(chain, dim=1)


def reverse_mean(schedule: DiffusionSchedule, t: int, a: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """One reverse step's mean from a_t and the denoiser's eps at step t:
    (a - beta_t / sqrt(1 - alpha_hat_t) * eps) / sqrt(alpha_t). At t = 0 it is the whole step (no noise
    is added there), before the final clip."""
    return (a - schedule.eps_coef[t] * eps) * schedule.inv_sqrt_alpha[t]


def sample_actions(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    obs: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    clip: bool = True,
) -> torch.Tensor:
    """Draw the chain's noise from ``generator`` and run :func:`ddpm_sample`."""
    noise = torch.randn(
        obs.shape[0], schedule.T, denoiser.act_dim,
        device=obs.device, dtype=obs.dtype, generator=generator,
    )
    return ddpm_sample(denoiser, schedule, obs, noise, temperature, clip)
