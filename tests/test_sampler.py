import pytest
import torch

from qsm_robot.qsm.networks import Denoiser
from qsm_robot.qsm.sampler import ddpm_sample, sample_actions
from qsm_robot.qsm.schedules import SCHEDULES, DiffusionSchedule


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("clip", [True, False])
def test_sample_shapes_and_bounds(schedule, clip):
    torch.manual_seed(0)
    d, s = Denoiser(3, 2, hidden_dim=16, time_dim=8, fourier_dim=4), DiffusionSchedule(schedule, 5)
    with torch.no_grad():
        d.trunk[-1].bias.fill_(-100.0)  # an extreme denoiser: actions must still end in [-1, 1]
        a = sample_actions(d, s, torch.randn(64, 3) * 1e3, temperature=1.0, clip=clip)
    assert a.shape == (64, 2) and a.dtype == torch.float32
    assert bool((a.abs() <= 1).all())


def test_sample_is_a_function_of_obs_and_noise():
    d, s = Denoiser(3, 2, hidden_dim=16, time_dim=8, fourier_dim=4), DiffusionSchedule("vp", 4)
    obs, noise = torch.randn(8, 3), torch.randn(8, 4, 2)
    with torch.no_grad():
        assert torch.equal(ddpm_sample(d, s, obs, noise), ddpm_sample(d, s, obs, noise))
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(sample_actions(d, s, obs, g1), sample_actions(d, s, obs, g2))
        assert not torch.equal(ddpm_sample(d, s, obs, noise), ddpm_sample(d, s, obs, torch.randn(8, 4, 2)))


def test_noise_of_the_wrong_shape_is_rejected():
    d, s = Denoiser(3, 2, hidden_dim=16, time_dim=8, fourier_dim=4), DiffusionSchedule("vp", 4)
    with pytest.raises(ValueError, match=r"noise must be \[B, T=4, act_dim=2\]"):
        ddpm_sample(d, s, torch.randn(8, 3), torch.randn(8, 5, 2))
