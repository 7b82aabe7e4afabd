"""n-step returns (train/replay.py: NStepReturns) and LayerNorm critics: by hand on small cases."""

import numpy as np
import pytest
import torch

from qsm_robot.qsm.networks import CriticEnsemble, EnsembleLayerNorm
from qsm_robot.train.replay import NStepReturns

G = 0.9


def run(n, rewards, terminated_at=None, truncated_at=None):
    acc, out = NStepReturns(n, G), []
    for t, r in enumerate(rewards):
        obs, nxt = np.array([t], np.float32), np.array([t + 1], np.float32)
        out += acc.push(obs, np.zeros(1, np.float32), r, nxt, t == terminated_at, t == truncated_at)
    return acc, [(int(o[0]), round(R, 6), int(s2[0]), term, round(b, 6)) for o, _, R, s2, term, b in out]


def test_n_step_transitions_sum_discounted_rewards_and_bootstrap_k_steps_on():
    acc, out = run(3, [1.0, 2.0, 4.0, 8.0])
    #         (s,  R = r_t + G r_t+1 + G^2 r_t+2,  s' = s_t+3, terminated, gamma^(k-1))
    assert out == [(0, round(1 + G * 2 + G**2 * 4, 6), 3, False, round(G**2, 6)),
                   (1, round(2 + G * 4 + G**2 * 8, 6), 4, False, round(G**2, 6))]
    assert len(acc.pending) == 2  # starts 2 and 3 wait for more rewards


@pytest.mark.parametrize("terminated", [True, False])
def test_an_episode_end_flushes_every_pending_start_with_fewer_rewards(terminated):
    kw = {"terminated_at": 2} if terminated else {"truncated_at": 2}
    acc, out = run(3, [1.0, 2.0, 4.0], **kw)
    assert [o[0] for o in out] == [0, 1, 2] and all(o[2] == 3 for o in out) and not acc.pending
    assert [o[1] for o in out] == [round(1 + G * 2 + G**2 * 4, 6), round(2 + G * 4, 6), 4.0]
    # A true terminal state never bootstraps; a time limit does, by gamma^k in all (mask gamma^(k-1)).
    assert [o[3] for o in out] == [terminated] * 3
    assert [o[4] for o in out] == [round(G**2, 6), round(G, 6), 1.0]


def test_one_step_passes_transitions_through_unchanged():
    _, out = run(1, [1.5, -2.0])
    assert out == [(0, 1.5, 1, False, 1.0), (1, -2.0, 2, False, 1.0)]


def test_pending_starts_survive_a_checkpoint_round_trip():
    acc, _ = run(3, [1.0, 2.0, 4.0, 8.0])
    other = NStepReturns(3, G)
    other.load_state_dict(acc.state_dict())
    step = (np.array([4], np.float32), np.zeros(1, np.float32), 16.0, np.array([5], np.float32), False, False)
    assert [t[2] for t in acc.push(*step)] == [t[2] for t in other.push(*step)]


def test_layer_norm_critics_normalise_each_member_with_its_own_scale():
    torch.manual_seed(0)
    critic = CriticEnsemble(3, 1, hidden_dim=8, num_layers=2, n=2, layer_norm=True)
    norms = [m for m in critic.modules() if isinstance(m, EnsembleLayerNorm)]
    assert len(norms) == 2 and norms[0].weight.shape == (2, 1, 8)
    x = torch.randn(2, 5, 8) * 10 + 3
    with torch.no_grad():
        norms[0].weight[1] *= 2  # member 1's scale only
        y = norms[0](x)
    assert torch.allclose(y[0].mean(-1), torch.zeros(5), atol=1e-5) and torch.allclose(y[0].std(-1, unbiased=False), torch.ones(5), atol=1e-3)
    assert torch.allclose(y[1].std(-1, unbiased=False), 2 * torch.ones(5), atol=2e-3)
    assert not any(isinstance(m, EnsembleLayerNorm) for m in CriticEnsemble(3, 1, 8, 2, 2).modules())
