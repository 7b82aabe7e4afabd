"""Q-selected sampling: the best of N diffusion samples under the learnt critics.

A QSM policy is a diffusion model whose density follows exp(M_q Q / scale): where the action
changes Q little (cartpole-swingup balancing upright), it stays wide, and every wide draw costs
reward (that task multiplies its reward by a control factor, 0.8 at a bound). Drawing N actions
from the chain and keeping the one the critics value most narrows the policy towards the critic's
greedy action without changing how it learns: the actor is still the denoiser regressed onto the
scaled action-gradient, and the chain still draws every candidate. Diffusion policies for RL use
this selection at evaluation (IDQL, Hansen-Estruch et al. 2023; EDP, Kang et al. 2023;
Diffusion-QL, Wang et al. 2023); here it is the evaluation policy of a run with
``eval_action_samples`` = N and, through ``qsm-export --action-samples``, the policy that the
exported student learns. Candidates are scored by the mean of the critic ensemble (the minimum is
the learning target's pessimism, not needed to rank actions at one state).

With N = 1 nothing is selected: the plain diffusion sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qsm_robot.checkpoint_layout import critic_state
from qsm_robot.qsm.networks import CriticEnsemble
from qsm_robot.qsm.policy import CheckpointError, DiffusionPolicy, load_policy, resolve_checkpoint


def best_of(obs: torch.Tensor, draw: Callable[[torch.Tensor], torch.Tensor], critic: nn.Module,
            samples: int, action: Callable[[torch.Tensor], torch.Tensor] = lambda c: c) -> torch.Tensor:
    """For obs [B, obs_dim]: ``samples`` candidates per state from ``draw`` (obs [B * N, obs_dim] ->
    candidates [B * N, ...], those of state b in rows b * N .. b * N + N - 1), and at each state the
    candidate whose action (``action(candidates)`` [B * N, act_dim]; the candidate itself by default,
    or the last row of a chain) has the highest mean critic value; [B, ...]."""
    if samples == 1:
        return draw(obs)
    repeated = obs.repeat_interleave(samples, dim=0)
    candidates = draw(repeated)
    value = critic(repeated, action(candidates)).mean(dim=0).view(obs.shape[0], samples)
    best = value.argmax(dim=1)
    return candidates.view(obs.shape[0], samples, *candidates.shape[1:])[torch.arange(obs.shape[0], device=obs.device), best]


class QSelectedPolicy(nn.Module):
    """A :class:`DiffusionPolicy` that acts by the best of ``samples`` draws under ``critic``.

    Same interface as the policy it wraps: ``sample(obs, noise)`` is deterministic in its noise,
    here [B, samples * T, act_dim] (candidate n's chain noise is rows n * T .. n * T + T - 1), and
    ``noise_shape`` says so."""

    def __init__(self, policy: DiffusionPolicy, critic: CriticEnsemble, samples: int):
        super().__init__()
        if samples < 1:
            raise ValueError(f"action samples must be >= 1, got {samples}")
        self.policy, self.critic, self.samples = policy, critic, samples
        self.spec = policy.spec

    @property
    def noise_shape(self) -> tuple[int, int]:
        """The ``noise`` input of :meth:`sample` per state: (samples * T, act_dim)."""
        steps, act_dim = self.policy.noise_shape
        return self.samples * steps, act_dim

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        chains = noise.reshape(obs.shape[0] * self.samples, *self.policy.noise_shape)
        return best_of(obs, lambda o: self.policy.sample(o, chains), self.critic, self.samples)

    @torch.no_grad()
    def chain(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The chosen candidate's whole chain [B, T+1, act_dim] (its last row is :meth:`sample`'s action)."""
        chains = noise.reshape(obs.shape[0] * self.samples, *self.policy.noise_shape)
        return best_of(obs, lambda o: self.policy.chain(o, chains), self.critic, self.samples, action=lambda c: c[:, -1])

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return best_of(obs, lambda o: self.policy.act(o, generator), self.critic, self.samples)


def load_critic(path: str | Path, device: str | torch.device = "cpu") -> CriticEnsemble:
    """The twin critics of a run directory's latest checkpoint (or of a checkpoint directory), from
    its training state; their shape is the policy's (width, depth), with LayerNorm where the saved
    state has its parameters. CheckpointError when the checkpoint holds no critics."""
    ckpt = resolve_checkpoint(path)
    saved = critic_state(ckpt)
    if saved is None:
        raise CheckpointError(f"{ckpt} holds no critics (no training state): Q-selected sampling needs the run's "
                              "checkpoint, not the policy files alone; or use one sample")
    spec = load_policy(ckpt).spec
    layer_norm = len(saved) == 4 * spec.num_layers + 2  # a LayerNorm's weight and bias per hidden layer
    critic = CriticEnsemble(spec.obs_dim, spec.act_dim, spec.hidden_dim, spec.num_layers, n=2, layer_norm=layer_norm)
    try:
        critic.load_state_dict({k: torch.from_numpy(v) for k, v in saved.items()})
    except RuntimeError as exc:
        raise CheckpointError(f"the critics in {ckpt} do not match its policy.json: {exc}") from None
    return critic.to(device).eval()


def load_selected_policy(path: str | Path, samples: int, device: str | torch.device = "cpu") -> DiffusionPolicy | QSelectedPolicy:
    """The policy of a run or checkpoint directory; with ``samples`` > 1, acting by the best of that
    many draws under the checkpoint's critics."""
    policy = load_policy(path, device)
    return policy if samples == 1 else QSelectedPolicy(policy, load_critic(path, device), samples)


def run_action_samples(checkpoint: str | Path) -> int:
    """The evaluation policy's sample count of the run a checkpoint belongs to (its config.json's
    ``eval_action_samples``); 1 for a run from before the field, or a checkpoint outside its run."""
    config = Path(resolve_checkpoint(checkpoint)).parent.parent / "config.json"
    try:
        samples = json.loads(config.read_text()).get("eval_action_samples", 1)
    except FileNotFoundError:
        return 1
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {config}: {exc}") from None
    if not isinstance(samples, int) or samples < 1:
        raise CheckpointError(f"{config}: eval_action_samples must be an integer >= 1, got {samples!r}")
    return samples
