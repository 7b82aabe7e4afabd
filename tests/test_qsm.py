"""The QSM update itself: the sign test, the critic target's masks, Polyak, the lr schedule."""

import csv
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from qsm_robot.qsm.learner import QSMConfig, QSMLearner, RunningRMS, qsm_actor_loss
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


class TwoKnownCritics(torch.nn.Module):
    """Two different critics: Q_i(s, a) = -k_i |a - c_i(s)|^2 with k = (1, 3), so
    grad_a Q_i = -2 k_i (a - c_i(s)), and neither their min nor either one alone has the mean's gradient."""

    k = (1.0, 3.0)

    @staticmethod
    def centres(obs):
        return 0.6 * torch.tanh(obs[:, :2]), -0.4 * torch.tanh(obs[:, 1:3])

    def forward(self, obs, act):
        return torch.stack([-k * ((act - c) ** 2).sum(-1) for k, c in zip(self.k, self.centres(obs))])

    @classmethod
    def mean_grad(cls, obs, act):
        grads = [-2 * k * (act - c) for k, c in zip(cls.k, cls.centres(obs))]
        return (grads[0] + grads[1]) / 2


def test_actor_loss_target_is_minus_mq_times_the_mean_critic_gradient():
    """A denoiser that outputs exactly -M_q * mean_i grad_a Q_i at a_t has zero loss (the card's
    step 3: the mean over the two critics, here two different ones); its negation does not."""
    torch.manual_seed(0)
    obs, act = torch.randn(32, 3), torch.rand(32, 2) * 2 - 1
    schedule, critic, mq = DiffusionSchedule("vp", 5), TwoKnownCritics(), 7.0

    class Oracle(torch.nn.Module):
        sign = 1.0

        def forward(self, obs, a_t, t):
            return self.sign * -mq * TwoKnownCritics.mean_grad(obs, a_t)

    oracle = Oracle()
    loss = qsm_actor_loss(oracle, critic, schedule, obs, act, mq, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    oracle.sign = -1.0
    assert qsm_actor_loss(oracle, critic, schedule, obs, act, mq, torch.Generator().manual_seed(1)).item() > 1.0


class ScaledCritics(torch.nn.Module):
    """TwoKnownCritics times a constant: the same task with rewards ``scale`` times larger."""

    def __init__(self, scale):
        super().__init__()
        self.scale, self.inner = scale, TwoKnownCritics()

    def forward(self, obs, act):
        return self.scale * self.inner(obs, act)


def test_running_rms_is_bias_corrected_and_tracks_the_stream():
    rms = RunningRMS(decay=0.99)
    assert rms.update(torch.full((8, 2), 3.0)).item() == pytest.approx(3.0)  # no shrink towards 0
    for _ in range(2000):
        rms.update(torch.full((8, 2), 0.5))
    assert rms.value().item() == pytest.approx(0.5, rel=1e-3)
    copy = RunningRMS(decay=0.99)
    copy.load_state_dict(rms.state_dict())
    assert copy.update(torch.ones(3)).item() == rms.update(torch.ones(3)).item()


@pytest.mark.parametrize("normalize", [False, True])
def test_scale_free_target_does_not_depend_on_the_reward_scale(normalize):
    """Scaling Q by 1000 scales the plain target by 1000; the scale-free target (g / running RMS
    of g) is the same for both, and its RMS over a batch is M_q."""
    torch.manual_seed(0)
    obs, act = torch.randn(256, 3), torch.rand(256, 2) * 2 - 1
    schedule, mq = DiffusionSchedule("vp", 5), 3.0
    targets = {}

    class Recorder(torch.nn.Module):
        def forward(self, obs, a_t, t):
            return torch.zeros_like(a_t, requires_grad=True)

    for scale in (1.0, 1000.0):
        loss = qsm_actor_loss(Recorder(), ScaledCritics(scale), schedule, obs, act, mq,
                              torch.Generator().manual_seed(1), RunningRMS(), normalize)
        targets[scale] = loss.item()  # mean target^2 (the denoiser outputs 0)
    if normalize:
        assert targets[1.0] == pytest.approx(mq ** 2, rel=1e-4)
        assert targets[1000.0] == pytest.approx(targets[1.0], rel=1e-4)
    else:
        assert targets[1000.0] == pytest.approx(1e6 * targets[1.0], rel=1e-4)


def test_learner_reports_the_same_gradient_rms_with_either_target():
    """The first update's critic step is the same in both; so is the RMS of its action-gradient."""
    torch.manual_seed(0)
    plain = tiny_learner().update(batch_of())
    torch.manual_seed(0)  # the same initial networks
    scaled = tiny_learner(q_grad_normalize=True).update(batch_of())
    assert plain["q_grad_rms"].item() > 0
    assert scaled["q_grad_rms"].item() == pytest.approx(plain["q_grad_rms"].item())
    assert scaled["actor_loss"].item() != pytest.approx(plain["actor_loss"].item())


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
    cfg = QSMConfig(hidden_dim=32, time_dim=16, fourier_dim=8, **overrides)
    return QSMLearner(cfg, obs_dim=3, act_dim=2, device=torch.device("cpu"))


def batch_of(B=16, mask=1.0):
    g = torch.Generator().manual_seed(2)
    return {
        "obs": torch.randn(B, 3, generator=g), "action": torch.rand(B, 2, generator=g) * 2 - 1,
        "reward": torch.rand(B, generator=g), "next_obs": torch.randn(B, 3, generator=g),
        "mask": torch.full((B,), mask),
    }


def card_vp_betas(T):
    """The card's "vp" schedule, written out: beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1)/(2 T^2))."""
    return [1 - math.exp(-0.1 / T - 0.5 * (10.0 - 0.1) * (2 * t - 1) / T**2) for t in range(1, T + 1)]


def test_critic_target_is_the_clipped_double_q_of_the_target_critics():
    """y = r + gamma * mask * min_i Q_i_target(s', a'), with a' the card's T-step chain plus
    N(0, 0.1^2), clipped, recomputed here by hand from the card with the same noise draws."""
    learner, b = tiny_learner(gamma=0.9, temperature=0.7), batch_of()
    for _ in range(3):  # a trained denoiser and critics, whose Polyak targets lag behind them
        learner.update(batch_of())
    with torch.no_grad():  # and targets far from the critics: the online critics give another y
        for p in learner.critic_target.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    B, T, mask = 16, 5, torch.tensor([0.0, 1.0] * 8)

    state = learner.generator.get_state()
    y = learner.critic_target_value(b["reward"], b["next_obs"], mask)
    # The generator's draws, in the learner's order: the chain's noise [B, T, act], then a''s noise.
    learner.generator.set_state(state)
    chain_noise = torch.randn(B, T, 2, generator=learner.generator)
    target_noise = torch.randn(B, 2, generator=learner.generator)

    betas = card_vp_betas(T)
    alpha_hats = np.cumprod([1 - beta for beta in betas])
    with torch.no_grad():
        a = chain_noise[:, 0]
        for t in range(T - 1, -1, -1):
            eps = learner.denoiser(b["next_obs"], a, torch.full((B,), t))
            a = (a - betas[t] / math.sqrt(1 - alpha_hats[t]) * eps) / math.sqrt(1 - betas[t])
            if t > 0:
                a = a + math.sqrt(betas[t]) * 0.7 * chain_noise[:, T - t]
            a = a.clamp(-1, 1)
        a_next = (a + 0.1 * target_noise).clamp(-1, 1)
        q1, q2 = learner.critic_target(b["next_obs"], a_next)
        expected = b["reward"] + 0.9 * mask * torch.minimum(q1, q2)
        online = b["reward"] + 0.9 * mask * learner.critic(b["next_obs"], a_next).min(dim=0).values
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5), (y - expected).abs().max()
    assert torch.equal(y[mask == 0], b["reward"][mask == 0])  # no bootstrap at a true terminal state
    assert not torch.allclose(online, expected, atol=1e-2)  # the check would see the online critics
    assert not torch.allclose(torch.maximum(q1, q2), torch.minimum(q1, q2), atol=1e-2)  # ... and a mean or max


def test_replay_masks_termination_but_not_truncation():
    replay = ReplayBuffer(3, 2, capacity=4, device=torch.device("cpu"))
    o, a = np.zeros(3, np.float32), np.zeros(2, np.float32)
    replay.add(o, a, 1.0, o, terminated=True)
    replay.add(o, a, 1.0, o, terminated=False)  # a time-limit truncation stores terminated=False
    assert replay.data["mask"][:2].tolist() == [0.0, 1.0]


class CountingEnv(gym.Env):
    """obs = [episode, step in episode, 0, 0, 0]; reward = 1 + step. The first episode ends in a true
    terminal state after 3 steps; later ones never terminate and run into the 4-step time limit."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self.episode, self.t = -1, 0

    def _obs(self):
        return np.array([self.episode, self.t, 0, 0, 0], np.float32)

    def reset(self, *, seed=None, options=None):
        self.episode, self.t = self.episode + 1, 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), float(self.t), self.episode == 0 and self.t == 3, False, {}


def test_evaluation_reports_the_share_of_action_components_at_a_bound(tmp_path):
    """Three eval envs, each action batch [-1, 0.995, 0.3]: two of three components lie within 1%
    of a bound, whatever the number of steps."""
    from qsm_robot.config import preset_config
    from qsm_robot.train.loop import Trainer

    cfg = preset_config("smoke", steps=20, eval_episodes=3, run_dir=str(tmp_path))
    trainer = Trainer(cfg, tmp_path)
    trainer.eval_envs = [gym.wrappers.TimeLimit(CountingEnv(), max_episode_steps=4) for _ in range(3)]
    trainer.learner.act = lambda obs, explore, generator=None: torch.tensor([[-1.0], [0.995], [0.3]])[: len(obs)]
    trainer.evaluate()
    trainer.log.close()
    [row] = list(csv.DictReader(open(tmp_path / "eval.csv")))
    assert float(row["saturated"]) == pytest.approx(round(2 / 3, 4))


def test_training_loop_stores_mask_0_on_termination_and_1_on_truncation(tmp_path):
    """The Trainer's own step (``collect``) on an env with a terminal state (episode 0, step 3) and
    a time limit (4 steps, gymnasium's TimeLimit): only the terminal transition gets mask 0."""
    from qsm_robot.config import preset_config
    from qsm_robot.train.loop import Trainer

    cfg = preset_config("smoke", steps=20, learning_starts=20, run_dir=str(tmp_path))
    trainer = Trainer(cfg, tmp_path)  # cartpole-swingup: obs_dim 5, act_dim 1, as CountingEnv
    trainer.env = gym.wrappers.TimeLimit(CountingEnv(), max_episode_steps=4)
    trainer.obs = trainer.env.reset()[0]
    finished = [trainer.collect() for _ in range(11)]
    trainer.log.close()

    assert finished == [None, None, 6.0, None, None, None, 10.0, None, None, None, 10.0]
    data = {k: v[: trainer.replay.size] for k, v in trainer.replay.data.items()}
    assert trainer.replay.size == 11
    #                 episode 0: terminal  episode 1: truncated  episode 2: truncated
    assert data["mask"].tolist() == [1, 1, 0] + [1, 1, 1, 1] + [1, 1, 1, 1]
    # s' of the last transition of an episode is that episode's final state, not the next reset.
    assert data["next_obs"][:, :2].tolist() == [[0, 1], [0, 2], [0, 3]] + [[1, t] for t in range(1, 5)] \
        + [[2, t] for t in range(1, 5)]
    assert data["obs"][:, :2].tolist() == [[0, 0], [0, 1], [0, 2]] + [[1, t] for t in range(4)] \
        + [[2, t] for t in range(4)]
    assert data["reward"].tolist() == [1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4]


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
        assert set(metrics) == {"critic_loss", "actor_loss", "q_mean", "q_grad_rms"}
        n = min(learner.num_updates, 4)
        assert learner.actor_lr() == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * n / 4)), abs=1e-12)


def test_learner_config_is_built_from_the_run_config_field_by_field():
    """The learner's defaults are the card's reference values, as TrainConfig's are, and a run's
    configuration reaches the learner unchanged (every QSMConfig field, by name)."""
    import dataclasses

    from qsm_robot.config import TrainConfig, preset_config
    from qsm_robot.train.loop import learner_config

    assert learner_config(TrainConfig()) == QSMConfig()
    cfg = preset_config("smoke", seed=3, q_grad_scale=120.0, schedule="cosine", init="torch", tau=0.01)
    built = learner_config(cfg)
    for f in dataclasses.fields(QSMConfig):
        assert getattr(built, f.name) == getattr(cfg, f.name), f.name
    with pytest.raises(ValueError, match="init"):
        QSMConfig(init="orthogonal")
