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

from qsm_robot.qsm.networks import Denoiser, Mish

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
SQRT_HALF = math.sqrt(0.5)
AT_BOUND = 1.0 - 1e-6
"""A target at or past +-AT_BOUND sits on the teacher's clip: a censored sample."""


class Standardize(nn.Module):
    """x -> (x - mean) / std, with the distillation states' statistics."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MixtureStudent(nn.Module):
    """(obs [B, obs_dim], noise [B, T, act_dim]) -> action in [-1, 1], a draw from the mixture at obs.

    The network's output is [logits (M) | component 0's mean (A), log-std (A) | component 1's ... ].
    """

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
        self.standardize: nn.Module = Standardize(obs_dim)
        layers: list[nn.Module] = []
        for d_in, d_out in zip([obs_dim] + [hidden_dim] * num_layers, [hidden_dim] * num_layers):
            layers += [nn.Linear(d_in, d_out), activation()]
        layers.append(nn.Linear(hidden_dim, components * (1 + 2 * act_dim)))
        self.net = nn.Sequential(*layers)
        # The sampler's two constant matrices (see forward): p @ cumulative - 1 = 2 * (cumulative weight of
        # components 0..M-2) - 1, and reached @ first + last = the one-hot of the first component reached.
        M = components
        self.register_buffer("cumulative", 2.0 * torch.ones(M, M - 1).triu())
        self.register_buffer("first", torch.eye(M)[:-1] - torch.eye(M)[1:])
        self.register_buffer("last", torch.eye(M)[-1])

    @classmethod
    @torch.no_grad()
    def from_teacher(cls, denoiser: Denoiser, teacher_steps: int, components: int = COMPONENTS) -> "MixtureStudent":
        """A student whose hidden layers start as the teacher's first denoising step at the mean of its
        initial noise: the denoiser at t = T-1 with a_T = 0 (its state weights, its bias plus the time
        code, its hidden layers, Mish), under a new mixture head; the fit then trains all of it.

        The teacher's own features of the state carry what decides its modes; a student learning them
        from samples alone places a mode switch slightly off, and the policy's own states sit near its
        switches. Its width, depth and activation are the teacher's; it reads raw observations, as the
        teacher does (no input standardisation). README, "Faithful students"."""
        hidden = [layer for layer in denoiser.trunk if isinstance(layer, nn.Linear)][:-1]
        student = cls(denoiser.obs_dim, denoiser.act_dim, teacher_steps, components, denoiser.input.out_features,
                      len(hidden) + 1, activation=Mish)
        student.standardize = nn.Identity()
        first, A = student.net[0], denoiser.act_dim
        first.weight.copy_(denoiser.input.weight[:, A:A + denoiser.obs_dim])
        time_code = denoiser.encode_time(torch.tensor([teacher_steps - 1], device=first.weight.device))[0]
        first.bias.copy_(denoiser.input.bias + time_code)
        for mine, theirs in zip(student.net[2:-1:2], hidden):
            mine.load_state_dict(theirs.state_dict())
        return student

    def fit_input(self, states: torch.Tensor) -> None:
        """Standardise the network's input with the distillation states' mean and standard deviation:
        raw observations mix positions near 1 with velocities near 10, and the mode weights switch
        sharply with the state; measured on the cartpole reference policy, W1 0.051 -> 0.046 and the
        worst state 0.152 -> 0.117 (README, "Faithful students"). After fitting, :meth:`fold_input`
        moves it into the first layer."""
        if not isinstance(self.standardize, Standardize):
            raise RuntimeError("fit_input after fold_input: the standardisation is already in the first layer")
        self.standardize.mean.copy_(states.mean(dim=0))
        self.standardize.std.copy_(states.std(dim=0).clamp_min(1e-3))

    @torch.no_grad()
    def fold_input(self) -> None:
        """Fold the input standardisation into the first layer, W' = W / std and b' = b - W' mean
        (the same function up to float rounding): the exported graph has no Sub and Div for it."""
        if isinstance(self.standardize, Standardize):
            first = self.net[0]
            first.weight.div_(self.standardize.std)
            first.bias.sub_(first.weight @ self.standardize.mean)
            self.standardize = nn.Identity()

    def head(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, M], raw parameters [B, M, 2 * act]: each component's mean, then its log-std
        before the bound) at each state."""
        out = self.net(self.standardize(obs))
        return out[:, :self.components], out[:, self.components:].reshape(-1, self.components, 2 * self.act_dim)

    def mixture(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, M], mean [B, M, act], log_std [B, M, act]) of the mixture at each state."""
        logits, params = self.head(obs)
        mean, raw_log_std = params.split(self.act_dim, dim=-1)
        return logits, mean.clamp(-MEAN_RANGE, MEAN_RANGE), soft_clamp(raw_log_std, *LOG_STD_RANGE)

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw: the component is the first whose cumulative weight reaches u = Phi(noise[:, 1, 0]),
        compared as 2 * cumulative - 1 >= erf(noise / sqrt 2) (the same test, two graph nodes fewer);
        the point is mean + std * noise[:, 0] of that component, clipped to [-1, 1].

        Written for a small graph (each ONNX node costs about as much as a layer at batch 1): the
        cumulative weights and the one-hot are constant matrix products, and only the picked
        component's parameters are bounded and used. The mean clamp of :meth:`mixture` is left
        out: it changes a draw only where |std * noise| > MEAN_RANGE - 1, and the clip below puts
        such a draw on the same bound."""
        logits, params = self.head(obs)
        edges = torch.addmm(self.cumulative.new_tensor(-1.0), torch.softmax(logits, dim=-1), self.cumulative)  # [B, M-1]
        reached = (edges >= torch.erf(noise[:, 1, :1] * SQRT_HALF)).to(obs.dtype)  # [B, M-1]: 0 ... 0 1 ... 1
        one_hot = torch.addmm(self.last, reached, self.first)  # [B, M]: the first reached, the last if none
        mean, raw_log_std = torch.bmm(one_hot[:, None, :], params)[:, 0].split(self.act_dim, dim=-1)
        return (mean + bounded_std(raw_log_std) * noise[:, 0]).clamp(-1.0, 1.0)


def soft_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x`` squashed smoothly to at most ``high`` and about at least ``low`` (within 0.01 for
    ``high - low`` > 5): about ``x`` well inside, and a gradient everywhere. A hard clamp has none
    outside its range, so a log-std that starts past the bound never moves."""
    return high - nn.functional.softplus(high - low - nn.functional.softplus(x - low))


def bounded_std(raw_log_std: torch.Tensor) -> torch.Tensor:
    """``soft_clamp(raw_log_std, *LOG_STD_RANGE).exp()`` in fewer graph nodes: exp(high - softplus(y))
    = e^high * sigmoid(-y)."""
    low, high = LOG_STD_RANGE
    return math.exp(high) * torch.sigmoid(nn.functional.softplus(raw_log_std - low) - (high - low))


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
