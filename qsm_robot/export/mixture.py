"""The mixture student: one network evaluation gives, at each state, a mixture of Gaussians over
the action (a mixture density network, Bishop 1994), fitted by maximum likelihood to samples of
the teacher; the exported graph then draws from it with the contract's noise input.

Why a mixture: the teacher's action distribution is often multi-modal (a bang-bang policy puts
its mass at both bounds). A deterministic map from Gaussian noise to such a distribution must jump
where the noise crosses from one mode's share to the other's, and a network fitted to that jump
leaves samples in between (the off-support share the distribution gate counts). A mixture keeps
the modes apart by construction: the noise first picks a component by its weight, then a point
in it, so a sample falls between modes only in the Gaussian tails.

The teacher clips its chain to [-1, 1], so much of its mass can sit exactly on a bound. The
likelihood treats such a sample as censored (a Tobit model): it scores the component's mass
beyond the bound, not its density there, and the student's own samples are clipped the same way.

Noise use (``noise`` [B, T, act_dim], the teacher's layout, T >= 2): ``noise[:, 1, 0]`` picks the
component (through the normal CDF, a uniform draw, against the cumulative weights) and
``noise[:, 0]`` is the standard normal draw inside it; the other entries are unused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

COMPONENTS = 8
"""Gaussians per state: more than the modes a trained policy shows (two or three per dimension)."""
LOG_STD_RANGE = (-7.0, math.log(0.5))
"""Bounds of a component's log standard deviation (in [-1, 1] action units), applied smoothly
(:func:`soft_clamp`): a mode of the teacher can be almost a point, and no component is wider than a
quarter of the action range. A wider one is a local optimum of the likelihood that the fit falls
into: one broad component centred between a bang-bang teacher's modes puts mass on both bounds
through the clip and the rest between them (cartpole reference policy: off-support 3.5% with
the bound at e^1, 1.1-1.6% at 0.5; README, "Faithful students")."""
MEAN_RANGE = 10.0
"""Component means are clamped to [-MEAN_RANGE, MEAN_RANGE]: past a bound only the mass the clip
puts on it matters, and an unbounded mean can grow until its squared z overflows float32."""
AT_BOUND = 1.0 - 1e-6
"""A target at or past +-AT_BOUND sits on the teacher's clip: a censored sample."""


class MixtureStudent(nn.Module):
    """(obs [B, obs_dim], noise [B, T, act_dim]) -> action in [-1, 1], a draw from the mixture at obs."""

    def __init__(self, obs_dim: int, act_dim: int, teacher_steps: int, components: int = COMPONENTS,
                 hidden_dim: int = 256, num_layers: int = 2, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        if teacher_steps < 2:
            raise ValueError(f"the mixture student reads two noise rows (a component pick and a draw); the teacher "
                             f"has T={teacher_steps}: use another --distill-method")
        if components < 1:
            raise ValueError(f"mixture components must be >= 1, got {components}")
        self.obs_dim, self.act_dim, self.teacher_steps, self.components = obs_dim, act_dim, teacher_steps, components
        self.steps = 1  # network evaluations per action
        layers: list[nn.Module] = []
        for d_in, d_out in zip([obs_dim] + [hidden_dim] * num_layers, [hidden_dim] * num_layers):
            layers += [nn.Linear(d_in, d_out), activation()]
        layers.append(nn.Linear(hidden_dim, components * (1 + 2 * act_dim)))
        self.net = nn.Sequential(*layers)
        self.register_buffer("component_ids", torch.arange(components, dtype=torch.float32))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def fit_input(self, states: torch.Tensor) -> None:
        """Standardise the network's input with the distillation states' mean and standard deviation
        (part of the graph): raw observations mix positions near 1 with velocities near 10, and the
        mode weights switch sharply with the state; measured on the cartpole reference policy, W1
        0.051 -> 0.046 and the worst state 0.152 -> 0.117 (README, "Faithful students")."""
        self.obs_mean.copy_(states.mean(dim=0))
        self.obs_std.copy_(states.std(dim=0).clamp_min(1e-3))

    def mixture(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, M], mean [B, M, act], log_std [B, M, act]) of the mixture at each state."""
        M, A = self.components, self.act_dim
        out = self.net((obs - self.obs_mean) / self.obs_std)
        logits = out[:, :M]
        mean = out[:, M:M + M * A].reshape(-1, M, A).clamp(-MEAN_RANGE, MEAN_RANGE)
        log_std = soft_clamp(out[:, M + M * A:].reshape(-1, M, A), *LOG_STD_RANGE)
        return logits, mean, log_std

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        logits, mean, log_std = self.mixture(obs)
        edges = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [B, M], the last is 1
        u = 0.5 * (1.0 + torch.erf(noise[:, 1, :1] / math.sqrt(2.0)))  # [B, 1], uniform on (0, 1)
        pick = (edges < u).to(obs.dtype).sum(dim=-1, keepdim=True).clamp(max=self.components - 1)
        one_hot = (self.component_ids == pick).to(obs.dtype)  # [B, M]
        draw = mean + log_std.exp() * noise[:, :1]  # [B, M, act]: noise[:, 0] inside every component
        return (one_hot[..., None] * draw).sum(dim=1).clamp(-1.0, 1.0)


def soft_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x`` squashed smoothly to at most ``high`` and about at least ``low`` (within 0.01 for
    ``high - low`` > 5): about ``x`` well inside, and a gradient everywhere. A hard clamp has none
    outside its range, so a log-std that starts past the bound never moves."""
    return high - nn.functional.softplus(high - low - nn.functional.softplus(x - low))


def censored_mixture_nll(logits: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
                         target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``target`` [B, act] in [-1, 1] under the mixtures
    (logits [B, M], mean and log_std [B, M, act]), each component a diagonal Gaussian clipped to
    [-1, 1]: a coordinate on a bound scores the mass the clip puts there (log Phi), any other the
    density."""
    z = (target[:, None, :] - mean) / log_std.exp()
    density = -0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    upper, lower = target[:, None, :] >= AT_BOUND, target[:, None, :] <= -AT_BOUND
    log_p = torch.where(upper, torch.special.log_ndtr(-z), torch.where(lower, torch.special.log_ndtr(z), density))
    return -torch.logsumexp(torch.log_softmax(logits, dim=-1) + log_p.sum(dim=-1), dim=-1).mean()
