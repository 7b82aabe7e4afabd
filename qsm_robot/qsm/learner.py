"""The QSM learner: one critic update and one actor update per call (card: "Actor loss",
"Critic loss"). Each step below is numbered as on the card.

All randomness comes from ``self.generator`` (a torch.Generator on the training device), so a
seeded run is reproducible and a checkpoint can restore it. Metrics are returned as tensors:
the update never waits on the device.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from qsm_robot.qsm.hyperparams import QSMConfig  # noqa: F401  (the learner's hyperparameters)
from qsm_robot.qsm.networks import CriticEnsemble, Denoiser, xavier_init_
from qsm_robot.qsm.sampler import sample_actions
from qsm_robot.qsm.schedules import DiffusionSchedule


class RunningRMS:
    """Root-mean-square of a stream of batches: an exponential moving average of mean(x^2) with
    Adam's bias correction (so the first batches are not shrunk towards 0). The scale-free QSM
    target divides grad_a Q by it."""

    def __init__(self, device: torch.device | str = "cpu", decay: float = 0.99):
        self.decay = decay
        self.mean_square = torch.zeros((), device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Fold in the batch ``x``; return the current RMS estimate (a 0-d tensor, > 0)."""
        self.mean_square.lerp_(x.pow(2).mean(), 1.0 - self.decay)
        self.count += 1
        return self.value()

    def value(self) -> torch.Tensor:
        """The bias-corrected RMS (1e-8 before any batch, never 0)."""
        corrected = self.mean_square / (1.0 - self.decay ** self.count) if self.count else self.mean_square
        return corrected.sqrt().clamp_min(1e-8)

    def state_dict(self) -> dict:
        return {"mean_square": self.mean_square.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean_square.copy_(state["mean_square"])
        self.count = int(state["count"])


def qsm_actor_loss(
    denoiser: Denoiser,
    critic: nn.Module,
    schedule: DiffusionSchedule,
    obs: torch.Tensor,
    act: torch.Tensor,
    q_grad_scale: float,
    generator: torch.Generator | None = None,
    grad_rms: RunningRMS | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """L_actor = mean || eps_theta(s, a_t, t) - (-M_q * g) ||^2 for a replay batch (s, a).

    ``critic(obs, act)`` returns [n_critics, B]; its parameters receive no gradient. ``grad_rms``,
    when given, folds in g's batch; with ``normalize`` (the scale-free target) g is then divided
    by that running RMS.
    """
    B, act_dim = act.shape
    # 1. t ~ Uniform{0..T-1}, eps ~ N(0, I)
    t = torch.randint(0, schedule.T, (B,), device=act.device, generator=generator)
    eps = torch.randn(act.shape, device=act.device, dtype=act.dtype, generator=generator)
    # 2. a_t = sqrt(alpha_hat[t]) * a + sqrt(1 - alpha_hat[t]) * eps    (noised buffer action)
    alpha_hat = schedule.alpha_hats[t][:, None]
    a_t = torch.sqrt(alpha_hat) * act + torch.sqrt(1 - alpha_hat) * eps
    # 3. g = mean over the critics of grad_a Q_i(s, a_t), at the noisy action, a constant target
    a_t = a_t.detach().requires_grad_(True)
    q = critic(obs, a_t)  # [n_critics, B]
    (g,) = torch.autograd.grad(q.mean(dim=0).sum(), a_t)
    assert g.shape == (B, act_dim)
    if grad_rms is not None:
        rms = grad_rms.update(g)
        if normalize:  # scale-free: g in units of its own running RMS
            g = g / rms
    elif normalize:
        raise ValueError("the scale-free target (normalize=True) needs grad_rms")
    target = -q_grad_scale * g
    # 4. L_actor = mean over batch (and action dims) of || eps_theta(s, a_t, t) - (-M_q g) ||^2
    eps_pred = denoiser(obs, a_t.detach(), t)
    assert eps_pred.shape == target.shape
    return ((eps_pred - target) ** 2).mean()


class QSMLearner(nn.Module):
    """Denoiser (the policy), twin critics and their Polyak targets, with their optimisers."""

    def __init__(self, cfg: QSMConfig, obs_dim: int, act_dim: int, device: torch.device):
        super().__init__()
        self.cfg, self.obs_dim, self.act_dim, self.device = cfg, obs_dim, act_dim, device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.seed)
        self.denoiser = Denoiser(obs_dim, act_dim, cfg.hidden_dim, cfg.num_layers, cfg.time_dim, cfg.fourier_dim)
        self.critic = CriticEnsemble(obs_dim, act_dim, cfg.hidden_dim, cfg.num_layers, n=2,
                                     layer_norm=cfg.critic_layer_norm)
        if cfg.init == "xavier":
            xavier_init_(self.denoiser)
            xavier_init_(self.critic)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.schedule = DiffusionSchedule(cfg.schedule, cfg.diffusion_steps)
        self.to(device)
        fused = device.type in ("cpu", "cuda")
        self.actor_opt = torch.optim.Adam(self.denoiser.parameters(), lr=cfg.actor_lr, fused=fused)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, fused=fused)
        # Cosine decay to 0 over actor_lr_decay_steps updates, then held at 0.
        decay = cfg.actor_lr_decay_steps
        self.actor_lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.actor_opt, lambda n: 0.5 * (1 + math.cos(math.pi * min(n, decay) / decay))
        )
        self.num_updates = 0
        self.grad_rms = RunningRMS(device)  # of grad_a Q: a metric, and the scale-free target's divisor

    @torch.no_grad()
    def act(self, obs: torch.Tensor, explore: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion sample for obs [B, obs_dim]; with ``explore``, plus N(0, sigma^2), clipped."""
        generator = generator or self.generator
        a = sample_actions(self.denoiser, self.schedule, obs, generator, self.cfg.temperature, self.cfg.clip_sample)
        if explore:
            noise = torch.randn(a.shape, device=a.device, generator=generator)
            a = (a + self.cfg.exploration_noise * noise).clamp(-1.0, 1.0)
        return a

    @torch.no_grad()
    def critic_target_value(self, reward, next_obs, mask) -> torch.Tensor:
        """y = r + gamma * mask * min_i Q_i_target(s', a'), a' = full sampler + N(0, 0.1^2), clipped."""
        next_a = sample_actions(
            self.denoiser, self.schedule, next_obs, self.generator, self.cfg.temperature, self.cfg.clip_sample
        )
        noise = torch.randn(next_a.shape, device=next_a.device, generator=self.generator)
        next_a = (next_a + self.cfg.target_noise * noise).clamp(-1.0, 1.0)
        next_q = self.critic_target(next_obs, next_a).min(dim=0).values  # [B]
        return reward + self.cfg.gamma * mask * next_q

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One critic update, one actor update, one Polyak step. Returns metric tensors."""
        obs, act, reward = batch["obs"], batch["action"], batch["reward"]
        next_obs, mask = batch["next_obs"], batch["mask"]
        B = obs.shape[0]
        assert act.shape == (B, self.act_dim) and reward.shape == (B,) and mask.shape == (B,)

        # Critic: each critic's mean squared error to y (clipped double-Q target).
        y = self.critic_target_value(reward, next_obs, mask)
        q = self.critic(obs, act)  # [2, B]
        critic_loss = ((q - y) ** 2).mean(dim=1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        # Actor: regress eps_theta onto -M_q * grad_a Q at noised replay actions.
        actor_loss = qsm_actor_loss(
            self.denoiser, self.critic, self.schedule, obs, act, self.cfg.q_grad_scale, self.generator,
            self.grad_rms, self.cfg.q_grad_normalize,
        )
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.actor_lr_schedule.step()

        # Target critics by Polyak averaging with tau.
        with torch.no_grad():
            torch._foreach_lerp_(
                list(self.critic_target.parameters()), list(self.critic.parameters()), self.cfg.tau
            )
        self.num_updates += 1
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "q_mean": q.mean().detach(),
                "q_grad_rms": self.grad_rms.value()}

    def actor_lr(self) -> float:
        return self.actor_opt.param_groups[0]["lr"]

