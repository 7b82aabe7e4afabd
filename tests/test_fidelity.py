"""The distribution gate (qsm_robot/export/fidelity.py) and the distillation objectives on a known
bimodal teacher: which student keeps the modes, and which averages them."""

import numpy as np
import pytest
import torch

from qsm_robot.export import fidelity
from qsm_robot.export.student import METHODS, StudentPolicy, energy_score_loss

LOW, HIGH = [-2.0, 0.0], [2.0, 10.0]  # two actuators with different ranges


def bimodal(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the mass at each end of every actuator's range (a bang-bang policy)."""
    side = rng.integers(0, 2, (len(obs), 2)).astype(np.float32)
    return np.asarray(LOW, np.float32) + side * (np.asarray(HIGH, np.float32) - np.asarray(LOW, np.float32))


def middle(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The average of the two modes: what a squared-error student drifts to."""
    return np.tile((np.asarray(LOW, np.float32) + np.asarray(HIGH, np.float32)) / 2, (len(obs), 1))


def shifted(fraction: float):
    """The bimodal policy with every action moved by ``fraction`` of the range (inside it)."""
    span = np.asarray(HIGH, np.float32) - np.asarray(LOW, np.float32)

    def policy(obs, rng):
        a = bimodal(obs, rng)
        return np.where(a > np.asarray(LOW), a - fraction * span, a + fraction * span)

    return policy


STATES = np.zeros((6, 3), np.float32)


def test_a_sampler_against_itself_passes_at_the_noise_floor():
    r = fidelity.measure(bimodal, bimodal, STATES, LOW, HIGH)
    assert r["passed"] and r["off_support_mean"] == 0.0
    assert 0 < r["floor_w1_mean"] < 0.1 and r["w1_mean"] == pytest.approx(r["floor_w1_mean"], abs=0.03)


def test_the_average_of_two_modes_fails_on_both_measures():
    r = fidelity.measure(bimodal, middle, STATES, LOW, HIGH)
    assert not r["passed"]
    assert r["w1_mean"] == pytest.approx(0.5, abs=0.01)  # every unit of mass moves half the range
    assert r["off_support_mean"] == 1.0 and r["off_support_worst"] == 1.0


@pytest.mark.parametrize("fraction", [0.02, 0.2])
def test_w1_is_the_shift_as_a_fraction_of_the_range_whatever_the_units(fraction):
    """Both actuators (ranges 4 and 10) give the same figure: one threshold fits every task."""
    r = fidelity.measure(bimodal, shifted(fraction), STATES, LOW, HIGH, samples=4096)
    assert r["w1_mean"] == pytest.approx(fraction, abs=0.02)
    assert r["passed"] == (fraction < 0.03)
    assert r["off_support_mean"] == (1.0 if fraction > 0.05 else 0.0)  # support_radius 0.05 of the range


def test_the_worst_state_is_named():
    def one_bad_state(obs, rng):
        return middle(obs, rng) if obs[0, 0] == 1 else bimodal(obs, rng)

    states = np.zeros((5, 3), np.float32)
    states[3, 0] = 1
    r = fidelity.measure(bimodal, one_bad_state, states, LOW, HIGH)
    assert r["worst_state"] == 3 and r["w1_worst"] == pytest.approx(0.5, abs=0.01)
    assert r["per_state_off_support"][3] == 1.0 and sum(r["per_state_off_support"]) == 1.0


def test_energy_score_prefers_the_modes_to_their_average():
    """The objective the energy student minimises ranks the right distribution first."""
    g = torch.Generator().manual_seed(0)
    teacher = (torch.randint(0, 2, (64, 32, 1), generator=g) * 2 - 1).float()
    modes = (torch.randint(0, 2, (64, 32, 1), generator=g) * 2 - 1).float()
    average = torch.zeros(64, 32, 1)
    assert energy_score_loss(modes, teacher) < energy_score_loss(average, teacher) - 0.2


class BimodalTeacher:
    """A stand-in DiffusionPolicy whose noise-to-action map jumps many times: action = the sign of
    sin(40 a_T), so each mode gets half the draws, interleaved finely in noise space (the trained
    walker and cartpole teachers' maps are of this kind: nearby noise draws land in either mode)."""

    class spec:
        obs_dim, act_dim, diffusion_steps = 3, 1, 5

    noise_shape = (5, 1)  # (T, act_dim), as DiffusionPolicy.noise_shape

    def sample(self, obs, noise):
        return torch.sign(torch.sin(40 * noise[:, 0, :1]) + 1e-6)


@pytest.mark.parametrize("method,keeps_modes", [("regression", False), ("energy", True), ("ot", True),
                                                ("mixture", True)])
def test_distillation_objectives_on_a_bimodal_teacher(method, keeps_modes):
    """The energy, ot and mixture students put their mass on the modes; the squared-error student, regressing
    onto targets that flip between the modes from one noise draw to the next, learns their average."""
    from qsm_robot.export.student import distill

    torch.manual_seed(0)
    states = torch.randn(256, 3)
    student, _ = distill(BimodalTeacher(), states, hidden_dim=32, iterations=400, batch_size=256, lr=3e-3,
                         progress=False, method=method, draws=16 if method == "energy" else 64)

    def run(obs, rng):
        noise = rng.standard_normal((len(obs), 5, 1), dtype=np.float32)
        with torch.no_grad():
            return student(torch.from_numpy(obs), torch.from_numpy(noise)).numpy()

    def teacher(obs, rng):
        return np.sign(rng.standard_normal((len(obs), 1)) + 1e-9).astype(np.float32)

    r = fidelity.measure(teacher, run, states[:8].numpy(), [-1.0], [1.0])
    assert (r["off_support_mean"] < 0.1) == keeps_modes, r


def test_methods_are_validated():
    from qsm_robot.export.student import distill

    assert set(METHODS) == {"mixture", "mixture-last", "ot", "stepwise", "regression", "l1", "energy"}
    with pytest.raises(ValueError, match="must be one of"):
        distill(BimodalTeacher(), torch.zeros(4, 3), iterations=1, progress=False, method="adversarial")
    with pytest.raises(ValueError, match="student init must be one of random, teacher"):
        distill(BimodalTeacher(), torch.zeros(4, 3), iterations=1, progress=False, method="mixture", init="pretrained")
    with pytest.raises(ValueError, match="--distill-method regression has no such student"):
        distill(BimodalTeacher(), torch.zeros(4, 3), iterations=1, progress=False, method="regression", init="teacher")
    assert StudentPolicy(3, 1, 5).forward(torch.zeros(2, 3), torch.zeros(2, 5, 1)).shape == (2, 1)
