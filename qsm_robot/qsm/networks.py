"""The denoiser eps_theta(s, a_t, t) and the twin critics Q_1, Q_2 (card: "Networks").

Both are plain MLPs. Two details are for speed and change no result:

* The denoiser's first layer acts on the concatenation [a_t, s, c(t)]; it is computed as the
  sum of three projections, so that the sampler can project the state once for all T steps
  and the time embedding once per step for the whole batch (``Denoiser.encode_obs``).
* The two critics are one ensemble module with stacked weights: each layer is a single batched
  matrix multiply for both critics instead of two.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _MishFunction(torch.autograd.Function):
    """mish(x) = x * tanh(softplus(x)), written with one sigmoid.

    With s = sigmoid(-x): tanh(softplus(x)) = (1 - s^2) / (1 + s^2), which never overflows.
    ``torch.nn.functional.mish`` gives the same values (to 1 float32 ulp-scale, tested) but
    its CPU kernel runs about 2x slower, forward and backward, than these few fused ops.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(-x)
        s2 = s * s
        tsp = (1 - s2) / (1 + s2)
        ctx.save_for_backward(x, s, tsp)
        return x * tsp

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, s, tsp = ctx.saved_tensors
        # d/dx [x tanh(sp(x))] = tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x)
        return grad * (tsp + x * (1 - tsp * tsp) * (1 - s))


class Mish(nn.Module):
    """Mish activation (see :class:`_MishFunction`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MishFunction.apply(x)


class FourierFeatures(nn.Module):
    """Learnable Fourier features of a scalar: [cos(2 pi t w), sin(2 pi t w)], w ~ N(0, 0.2^2)."""

    def __init__(self, dim: int = 64, std: float = 0.2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim // 2, 1) * std)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * t[:, None].to(self.weight.dtype) @ self.weight.T
        return torch.cat([torch.cos(f), torch.sin(f)], dim=-1)


class Denoiser(nn.Module):
    """eps_theta(s, a_t, t): input [a_t, s, c(t)], trunk MLP with Mish, linear output."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int = 512,
        num_layers: int = 2,
        time_dim: int = 128,
        fourier_dim: int = 64,
    ):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        # c(t) = MLP(time_dim, time_dim, Mish) of the Fourier features of t.
        self.time_embed = nn.Sequential(
            FourierFeatures(fourier_dim),
            nn.Linear(fourier_dim, time_dim),
            Mish(),
            nn.Linear(time_dim, time_dim),
        )
        # First trunk layer on [a_t, s, c(t)], kept as one weight and split at use.
        self.input = nn.Linear(act_dim + obs_dim + time_dim, hidden_dim)
        layers: list[nn.Module] = [Mish()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), Mish()]
        layers.append(nn.Linear(hidden_dim, act_dim))
        self.trunk = nn.Sequential(*layers)

    def encode_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """The state's share of the first layer (with its bias); reusable across steps."""
        w_s = self.input.weight[:, self.act_dim : self.act_dim + self.obs_dim]
        return torch.addmm(self.input.bias, obs, w_s.T)

    def encode_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time embedding's share of the first layer, for integer steps ``t`` [N]."""
        w_c = self.input.weight[:, self.act_dim + self.obs_dim :]
        return self.time_embed(t) @ w_c.T

    def denoise(self, obs_code: torch.Tensor, a_t: torch.Tensor, time_code: torch.Tensor):
        """eps_theta from the encoded state, the noisy action and the encoded time."""
        w_a = self.input.weight[:, : self.act_dim]
        return self.trunk(obs_code + a_t @ w_a.T + time_code)

    def forward(self, obs: torch.Tensor, a_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(s, a_t, t) for a batch: obs [B, obs_dim], a_t [B, act_dim], t [B]."""
        return self.denoise(self.encode_obs(obs), a_t, self.encode_time(t))


class EnsembleLinear(nn.Module):
    """``n`` independent linear layers applied as one batched matmul: [n, B, in] -> [n, B, out]."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim))
        bound = 1 / math.sqrt(in_dim)  # torch.nn.Linear's default initialisation
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(self.weight.shape[1:]) > 16:
            return torch.baddbmm(self.bias, x, self.weight)
        # A thin layer (the critic's input or output) as one 2-D matmul per member: batched
        # matrix-vector products are ~15x slower than 2-D ones in MKL on the CPU.
        return torch.stack([torch.addmm(b, xi, w) for b, xi, w in zip(self.bias, x, self.weight)])


def xavier_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform weights and zero biases for every dense layer in ``module`` (card: "Networks").

    Fourier feature weights are left as drawn (N(0, 0.2^2)). An :class:`EnsembleLinear` member is
    a dense layer of its own: fan_in and fan_out are its in_dim and out_dim, not the stack's.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, EnsembleLinear):
            _, fan_in, fan_out = m.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
    return module


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dimension with a scale and shift of each member's own: [n, B, d]."""

    def __init__(self, n: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n, 1, dim))
        self.bias = nn.Parameter(torch.zeros(n, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias


class CriticEnsemble(nn.Module):
    """``n`` independent Q(s, a) MLPs with ReLU (and, with ``layer_norm``, a LayerNorm before each
    ReLU); forward returns [n, B]."""

    def __init__(
        self, obs_dim: int, act_dim: int, hidden_dim: int = 512, num_layers: int = 2, n: int = 2,
        layer_norm: bool = False,
    ):
        super().__init__()
        self.n = n
        dims = [obs_dim + act_dim] + [hidden_dim] * num_layers
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers.append(EnsembleLinear(n, d_in, d_out))
            if layer_norm:
                layers.append(EnsembleLayerNorm(n, d_out))
            layers.append(nn.ReLU())
        layers.append(EnsembleLinear(n, hidden_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], dim=-1)
        return self.net(x.expand(self.n, *x.shape)).squeeze(-1)
