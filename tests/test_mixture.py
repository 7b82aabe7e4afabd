"""The mixture student (qsm_robot/export/mixture.py): its censored likelihood and its sampler."""

import math

import pytest
import torch

from qsm_robot.export.mixture import (
    LOG_STD_RANGE, MixtureStudent, bounded_std, censored_mixture_nll, soft_clamp,
)
from qsm_robot.qsm.networks import Denoiser, Mish


def fixed(student: MixtureStudent, logits, mean, log_std):
    """Make ``student``'s network give the same mixture at every state (log-stds well inside the bound)."""
    B = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    params = torch.cat([B(mean), B(log_std)], dim=-1)
    student.head = lambda obs: (B(logits).expand(len(obs), -1), params.expand(len(obs), -1, -1))
    return student


def test_the_likelihood_is_the_density_inside_and_the_clipped_mass_on_a_bound():
    logits, mean, log_std = torch.zeros(1, 1), torch.tensor([[[0.5]]]), torch.tensor([[[math.log(0.5)]]])
    normal = torch.distributions.Normal(0.5, 0.5)
    inside = censored_mixture_nll(logits, mean, log_std, torch.tensor([[0.2]]))
    assert inside.item() == pytest.approx(-normal.log_prob(torch.tensor(0.2)).item(), abs=1e-5)
    upper = censored_mixture_nll(logits, mean, log_std, torch.tensor([[1.0]]))  # P(X >= 1) = P(Z >= 1)
    assert upper.item() == pytest.approx(-math.log(1 - normal.cdf(torch.tensor(1.0)).item()), abs=1e-5)
    lower = censored_mixture_nll(logits, mean, log_std, torch.tensor([[-1.0]]))  # P(X <= -1) = P(Z <= -3)
    assert lower.item() == pytest.approx(-math.log(normal.cdf(torch.tensor(-1.0)).item()), abs=1e-4)


def test_a_mixture_scores_a_sample_by_its_components_weights():
    # two narrow components at -0.5 (weight 1/4) and +0.5 (weight 3/4): a sample at +0.5 is 3x as likely
    logits = torch.log(torch.tensor([[0.25, 0.75]]))
    mean, log_std = torch.tensor([[[-0.5], [0.5]]]), torch.full((1, 2, 1), math.log(0.01))
    nll = {x: censored_mixture_nll(logits, mean, log_std, torch.tensor([[x]])).item() for x in (-0.5, 0.5, 0.0)}
    assert nll[-0.5] - nll[0.5] == pytest.approx(math.log(3), abs=1e-4)
    assert nll[0.0] > nll[0.5] + 1000  # between the modes: no mass


def test_the_noise_picks_components_by_weight_and_samples_stay_in_them():
    student = fixed(MixtureStudent(3, 2, teacher_steps=5, components=3, hidden_dim=8),
                    [math.log(0.2), math.log(0.3), math.log(0.5)],
                    [[-0.6, 0.0], [0.1, 0.0], [2.0, -3.0]], [[-5.0, -5.0]] * 3)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20_000, 5, 2, generator=g)
    a = student(torch.zeros(20_000, 3), noise)
    share = [((a[:, 0] - m).abs() < 0.05).float().mean().item() for m in (-0.6, 0.1, 1.0)]  # the third is clipped
    assert share == pytest.approx([0.2, 0.3, 0.5], abs=0.015)
    u = torch.special.ndtr(noise[:, 1, 0])  # the pick is exactly the component whose weight interval holds u
    expect = torch.where(u <= 0.2, -0.6, torch.where(u <= 0.5, 0.1, 1.0))
    assert (((a[:, 0] - expect).abs() < 0.05) | ((u - 0.2).abs() < 1e-6) | ((u - 0.5).abs() < 1e-6)).all()
    assert sum(share) == pytest.approx(1.0)  # nothing between the components
    assert (a[:, 1][a[:, 0] == 1.0] == -1.0).all()  # clipped to [-1, 1] in every dimension


def test_component_widths_stay_in_range_and_learn_from_outside_it():
    low, high = LOG_STD_RANGE
    x = torch.tensor([-50.0, low - 2, low + 2, high - 2, high + 2, 50.0], requires_grad=True)
    y = soft_clamp(x, low, high)
    assert (y >= low - 0.01).all() and (y <= high).all() and (y.diff() > 0).all()
    assert y[2].item() == pytest.approx(low + 2, abs=0.15) and y[3].item() == pytest.approx(high - 2, abs=0.15)
    y.sum().backward()
    assert x.grad[1] > 0.05 and x.grad[4] > 0.05  # a hard clamp gives 0 there: a width that starts past the bound never moves
    student = MixtureStudent(3, 2, teacher_steps=5, hidden_dim=8)
    with torch.no_grad():
        student.net[-1].bias.fill_(100.0)
    _, _, log_std = student.mixture(torch.randn(4, 3))
    assert log_std.max().item() <= high
    log_std.sum().backward()  # the student's own widths, started far past the bound, still learn
    M, A = student.components, student.act_dim
    assert (student.net[-1].bias.grad[M:].view(M, 2 * A)[:, A:].abs() > 0).all()
    raw = torch.linspace(-60.0, 60.0, 2001)  # the sampler's width is the same bound, in fewer graph nodes
    assert torch.allclose(bounded_std(raw), soft_clamp(raw, low, high).exp(), rtol=1e-5, atol=1e-12)


def test_folding_the_input_standardisation_keeps_the_sampler_and_the_mixture():
    torch.manual_seed(0)
    student = MixtureStudent(4, 3, teacher_steps=5, hidden_dim=16)
    student.fit_input(torch.randn(500, 4) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + 5.0)
    obs, noise = torch.randn(256, 4) * 5, torch.randn(256, 5, 3)
    with torch.no_grad():
        before, mixture = student(obs, noise), student.mixture(obs)
        student.fold_input()
        after, folded = student(obs, noise), student.mixture(obs)
    assert not hasattr(student.standardize, "mean")  # nothing left of it in the graph
    for x, y in zip(mixture, folded):
        assert torch.allclose(x, y, atol=1e-4)
    assert ((before - after).abs() < 1e-4).float().mean() > 0.99  # a draw moves only where u sits on an edge
    with pytest.raises(RuntimeError, match="already in the first layer"):
        student.fit_input(torch.randn(10, 4))


def test_one_component_is_a_clipped_gaussian():
    student = fixed(MixtureStudent(2, 1, teacher_steps=2, components=1, hidden_dim=8), [0.0], [[0.3]], [[math.log(0.2)]])
    noise = torch.randn(1000, 2, 1)
    std = soft_clamp(torch.tensor(math.log(0.2)), *LOG_STD_RANGE).exp()  # 0.2, a little narrower near the bound
    assert torch.allclose(student(torch.zeros(1000, 2), noise)[:, 0], (0.3 + std * noise[:, 0, 0]).clamp(-1, 1), atol=1e-5)


def test_only_two_noise_rows_are_read():
    torch.manual_seed(0)
    student = MixtureStudent(3, 2, teacher_steps=5, hidden_dim=8)
    obs, noise = torch.randn(16, 3), torch.randn(16, 5, 2)
    other = noise.clone()
    other[:, 2:] = torch.randn(16, 3, 2)
    other[:, 1, 1] = 7.0
    assert torch.equal(student(obs, noise), student(obs, other))
    moved = noise.clone()
    moved[:, 0] += 0.5
    assert not torch.equal(student(obs, noise), student(obs, moved))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="two noise rows"):
        MixtureStudent(3, 1, teacher_steps=1)
    with pytest.raises(ValueError, match="components must be >= 1"):
        MixtureStudent(3, 1, teacher_steps=5, components=0)


@pytest.mark.parametrize("layers", [2, 3])
def test_a_teacher_started_student_computes_the_teachers_first_step_features(layers):
    torch.manual_seed(0)
    teacher = Denoiser(obs_dim=3, act_dim=2, hidden_dim=16, num_layers=layers, time_dim=8, fourier_dim=8)
    student = MixtureStudent.from_teacher(teacher, teacher_steps=5, components=4)
    obs = torch.randn(32, 3)
    # the teacher's hidden features at its first denoising step (t = T-1 = 4) from a_T = 0
    x = teacher.input(torch.cat([torch.zeros(32, 2), obs, teacher.time_embed(torch.full((32,), 4))], dim=-1))
    assert torch.allclose(student.net[:-1](student.standardize(obs)), teacher.trunk[:-1](x), atol=1e-5)
    hidden = [m for m in student.net if isinstance(m, torch.nn.Linear)]
    assert len(hidden) == layers + 1 and hidden[0].out_features == 16 and isinstance(student.net[1], Mish)
    assert hidden[-1].out_features == 4 * (1 + 2 * 2)  # a new mixture head
    student(obs, torch.randn(32, 5, 2))  # and it samples
    student.fold_input()  # nothing to fold: the teacher reads raw observations
    assert torch.allclose(student.net[:-1](obs), teacher.trunk[:-1](x), atol=1e-5)
