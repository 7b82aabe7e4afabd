import pytest
import torch

from qsm_robot.qsm.schedules import SCHEDULES, DiffusionSchedule, make_betas


def test_vp_schedule_matches_the_card():
    s = DiffusionSchedule("vp", 5)
    assert s.betas.tolist() == pytest.approx([0.1959, 0.4588, 0.6358, 0.7549, 0.8350], abs=1e-4)
    assert s.alpha_hats.tolist() == pytest.approx([0.8041, 0.4352, 0.1585, 0.0389, 0.0064], abs=1e-4)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1, 5, 20])
def test_schedules_are_valid_noise_levels(name, T):
    s = DiffusionSchedule(name, T)
    assert s.betas.shape == (T,)
    assert bool(((s.betas > 0) & (s.betas < 1)).all())
    assert bool((s.alpha_hats[1:] < s.alpha_hats[:-1]).all())  # more noise at every step
    assert s.eps_coef == pytest.approx((s.betas / torch.sqrt(1 - s.alpha_hats)).tolist(), abs=1e-5)


def test_linear_schedule_endpoints():
    betas = make_betas("linear", 10)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(2e-2)


def test_bad_schedule_and_T_are_rejected():
    with pytest.raises(ValueError, match="unknown schedule 'foo'"):
        make_betas("foo", 5)
    with pytest.raises(ValueError, match="T must be >= 1"):
        make_betas("vp", 0)
