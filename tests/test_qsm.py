"""The QSM update itself: the sign test, the critic target's masks, Polyak, the lr schedule."""

import math

import numpy as np
import pytest
import torch

from qsm_robot.config import preset_config
from qsm_robot.qsm.learner import QSMLearner, qsm_actor_loss
from qsm_robot.qsm.networks import Denoiser
from qsm_robot.qsm.sampler import sample_actions
from qsm_robot.qsm.schedules import DiffusionSchedule
from qsm_robot.train.replay import ReplayBuffer


class KnownCritic(torch.nn.Module):
    """Two identical critics Q(s, a) = -|a - a*(s)|^2 with a*(s) = 0.6 tanh(s[:, :2])."""

    @staticmethod
    def best_action(obs):
        return 0.6 * torch.tanh(obs[:, :2])

    def forward(self, obs, act):
        q = -((act - self.best_action(obs)) ** 2).sum(-1)
        return torch.stack([q, q])


def test_actor_loss_target_is_minus_mq_times_the_critic_gradient():
    """A denoiser that outputs exactly -M_q grad_a Q at a_t has zero loss; its negation does not."""
    torch.manual_seed(0)
    obs, act = torch.randn(32, 3), torch.rand(32, 2) * 2 - 1
    schedule, critic, mq = DiffusionSchedule("vp", 5), KnownCritic(), 7.0

    class Oracle(torch.nn.Module):
        sign = 1.0

        def forward(self, obs, a_t, t):
            return self.sign * -mq * (-2 * (a_t - KnownCritic.best_action(obs)))

    oracle = Oracle()
    loss = qsm_actor_loss(oracle, critic, schedule, obs, act, mq, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    oracle.sign = -1.0
    assert qsm_actor_loss(oracle, critic, schedule, obs, act, mq, torch.Generator().manual_seed(1)).item() > 1.0


def test_sign_qsm_updates_move_samples_to_the_argmax_of_a_known_concave_q():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    denoiser, schedule, critic = Denoiser(3, 2, hidden_dim=64, time_dim=16, fourier_dim=8), DiffusionSchedule("vp", 5), KnownCritic()
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    test_obs = torch.randn(512, 3)

    def distance(temperature):
        with torch.no_grad():
            a = sample_actions(denoiser, schedule, test_obs, torch.Generator().manual_seed(5), temperature)
        return (a - KnownCritic.best_action(test_obs)).norm(dim=-1).mean().item()

    before = {temp: distance(temp) for temp in (0.0, 1.0)}
    for _ in range(300):
        obs, act = torch.randn(128, 3), torch.rand(128, 2) * 2 - 1  # replay actions: uniform
        loss = qsm_actor_loss(denoiser, critic, schedule, obs, act, q_grad_scale=0.5, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {temp: distance(temp) for temp in (0.0, 1.0)}
    assert min(before.values()) > 1.0
    # The chain's drift (no noise) lands near a*(s); with the sampling noise the samples spread
    # around it but are still far closer than before training.
    assert after[0.0] < 0.25 * before[0.0], (before, after)
    assert after[1.0] < 0.5 * before[1.0], (before, after)

def tiny_learner(**overrides):
    cfg = preset_config("smoke", **overrides).validate()
    return QSMLearner(cfg, obs_dim=3, act_dim=2, device=torch.device("cpu"))


def batch_of(B=16, mask=1.0):
    g = torch.Generator().manual_seed(2)
    return {
        "obs": torch.randn(B, 3, generator=g), "action": torch.rand(B, 2, generator=g) * 2 - 1,
        "reward": torch.rand(B, generator=g), "next_obs": torch.randn(B, 3, generator=g),
        "mask": torch.full((B,), mask),
    }


def test_critic_target_bootstraps_only_through_non_terminal_transitions():
    learner, b = tiny_learner(), batch_of()
    state = learner.generator.get_state()
    y_terminal = learner.critic_target_value(b["reward"], b["next_obs"], torch.zeros(16))
    assert torch.equal(y_terminal, b["reward"])

    learner.generator.set_state(state)
    y = learner.critic_target_value(b["reward"], b["next_obs"], torch.ones(16))
    # Recompute min_i Q_i_target(s', a') with the same noise: a' = sampler + 0.1 noise, clipped.
    learner.generator.set_state(state)
    with torch.no_grad():
        a_next = sample_actions(learner.denoiser, learner.schedule, b["next_obs"], learner.generator)
        a_next = (a_next + 0.1 * torch.randn(a_next.shape, generator=learner.generator)).clamp(-1, 1)
        min_q = learner.critic_target(b["next_obs"], a_next).min(dim=0).values
    assert torch.allclose(y, b["reward"] + 0.99 * min_q)


def test_replay_masks_termination_but_not_truncation():
    replay = ReplayBuffer(3, 2, capacity=4, device=torch.device("cpu"))
    o, a = np.zeros(3, np.float32), np.zeros(2, np.float32)
    replay.add(o, a, 1.0, o, terminated=True)
    replay.add(o, a, 1.0, o, terminated=False)  # a time-limit truncation stores terminated=False
    assert replay.data["mask"][:2].tolist() == [0.0, 1.0]


def test_update_moves_targets_by_polyak_and_decays_the_actor_lr():
    learner = tiny_learner(actor_lr_decay_steps=4, tau=0.25)
    for _ in range(6):
        target_before = [p.clone() for p in learner.critic_target.parameters()]
        denoiser_before = [p.clone() for p in learner.denoiser.parameters()]
        metrics = learner.update(batch_of())
        for tb, t, c in zip(target_before, learner.critic_target.parameters(), learner.critic.parameters()):
            assert torch.allclose(t, 0.75 * tb + 0.25 * c, atol=1e-6)
        changed = any(not torch.equal(b, p) for b, p in zip(denoiser_before, learner.denoiser.parameters()))
        assert changed == (learner.num_updates <= 4)  # lr is 0 after the decay
        assert set(metrics) == {"critic_loss", "actor_loss", "q_mean"}
        n = min(learner.num_updates, 4)
        assert learner.actor_lr() == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * n / 4)), abs=1e-12)
