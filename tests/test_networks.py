import pytest
import torch
import torch.nn.functional as F

from qsm_robot.qsm.networks import CriticEnsemble, Denoiser, EnsembleLinear, Mish


def test_mish_matches_torch_values_and_gradients():
    x = torch.linspace(-60, 60, 20001, dtype=torch.float64, requires_grad=True)
    ours, ref = Mish()(x), F.mish(x)
    assert torch.allclose(ours, ref, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)
    x32 = torch.randn(1000) * 10
    assert torch.allclose(Mish()(x32), F.mish(x32), atol=2e-6)


@pytest.mark.parametrize("in_dim,out_dim", [(6, 64), (64, 64), (64, 1)])
def test_ensemble_linear_equals_independent_layers(in_dim, out_dim):
    layer = EnsembleLinear(3, in_dim, out_dim)
    x = torch.randn(3, 7, in_dim)
    expected = torch.stack([x[i] @ layer.weight[i] + layer.bias[i] for i in range(3)])
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_critics_are_independent():
    critic = CriticEnsemble(4, 2, hidden_dim=16)
    obs, act = torch.randn(5, 4), torch.randn(5, 2)
    q = critic(obs, act)
    assert q.shape == (2, 5)
    assert not torch.allclose(q[0], q[1])


def test_denoiser_split_first_layer_equals_the_concatenated_input():
    d = Denoiser(obs_dim=4, act_dim=2, hidden_dim=32, time_dim=16, fourier_dim=8)
    obs, a, t = torch.randn(6, 4), torch.randn(6, 2), torch.randint(0, 5, (6,))
    h = torch.cat([a, obs, d.time_embed(t)], dim=-1) @ d.input.weight.T + d.input.bias
    assert torch.allclose(d(obs, a, t), d.trunk(h), atol=1e-5)


def _dense_layers(module):
    return [m for m in module.modules() if isinstance(m, (torch.nn.Linear, EnsembleLinear))]


@pytest.mark.parametrize("init", ["xavier", "torch"])
def test_learner_initialisation_follows_the_config(init):
    """xavier: every dense layer of denoiser, time MLP and critics is Xavier-uniform with zero bias
    (card: "Networks"); the Fourier weights stay N(0, 0.2^2). torch: nn.Linear's default."""
    from qsm_robot.qsm.learner import QSMConfig, QSMLearner

    torch.manual_seed(0)
    cfg = QSMConfig(init=init, hidden_dim=256)
    learner = QSMLearner(cfg, obs_dim=24, act_dim=6, device=torch.device("cpu"))
    layers = _dense_layers(learner.denoiser) + _dense_layers(learner.critic)
    assert len(layers) == 3 + 2 + 3  # trunk in/hidden/out + time MLP 2 + critic 3 (stacked)
    for layer in layers:
        w = layer.weight if isinstance(layer, EnsembleLinear) else layer.weight.T  # [.., in, out]
        fan_in, fan_out = w.shape[-2:]
        xavier = (6 / (fan_in + fan_out)) ** 0.5
        default = fan_in ** -0.5
        if init == "xavier":
            assert torch.count_nonzero(layer.bias) == 0
            assert w.abs().max() <= xavier
            # uniform on [-b, b] has std b / sqrt(3): a wrong fan (e.g. the stack's) would miss it
            assert w.std().item() == pytest.approx(xavier / 3**0.5, rel=0.1 if w.numel() > 1000 else 0.5)
        else:
            assert torch.count_nonzero(layer.bias) > 0
            assert w.abs().max() <= default
    fourier = learner.denoiser.time_embed[0].weight
    assert fourier.std().item() == pytest.approx(0.2, rel=0.5)
    # The target critics start equal to the critics.
    for p, q in zip(learner.critic.parameters(), learner.critic_target.parameters()):
        assert torch.equal(p, q)
