"""The students of qsm_robot/export/student.py: the stepwise student's stretches of the teacher's
chain and its loss, the optimal-transport pairing, a map of the initial noise only."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from test_export import tiny_spec

from qsm_robot.export.mixture import MixtureStudent
from qsm_robot.export.student import (ActuatorPolicy, StudentPolicy, TeacherLastStep, bounded_regression_loss, distill,
                                      jittered, ot_dataset, ot_pairing, stepwise_loss, teacher_draws)
from qsm_robot.qsm.policy import DiffusionPolicy


@pytest.mark.parametrize("T,K,expected", [
    (5, 1, [(0, 0, 5)]),
    (5, 5, [(4, 0, 1), (3, 1, 2), (2, 2, 3), (1, 3, 4), (0, 4, 5)]),
    (4, 2, [(1, 0, 2), (0, 2, 4)]),
    (6, 4, [(3, 0, 2), (2, 2, 3), (1, 3, 4), (0, 4, 6)]),
])
def test_stretches_cover_the_chain_in_order_without_gaps(T, K, expected):
    assert StudentPolicy(3, 1, T, steps=K).stretches() == expected


class TeacherStep(torch.nn.Module):
    """An oracle 'MLP' for a K = T student: reads (a, obs, noise, step code) from its input and
    returns the teacher's own step t = k before its clip (the card's DDPM update, written out)."""

    def __init__(self, teacher: DiffusionPolicy):
        super().__init__()
        self.teacher = teacher

    def forward(self, x):
        spec, sched = self.teacher.spec, self.teacher.schedule
        T, A, O = spec.diffusion_steps, spec.act_dim, spec.obs_dim
        a, obs, noise = x[:, :A], x[:, A:A + O], x[:, A + O:A + O + T * A].reshape(-1, T, A)
        (k,) = set(x[:, -T:].argmax(dim=-1).tolist())
        eps = self.teacher.denoiser(obs, a, torch.full((x.shape[0],), k))
        a = (a - sched.eps_coef[k] * eps) * sched.inv_sqrt_alpha[k]
        return a + sched.sigma[k] * noise[:, T - k] if k > 0 else a


@pytest.mark.parametrize("clip", [True, False])
def test_a_student_that_takes_the_teachers_steps_has_zero_stepwise_loss(clip):
    """With K = T and an exact step the student is the teacher's chain sample by sample; the
    stepwise loss is then 0 and grows when one step is wrong; the clips between steps matter."""
    torch.manual_seed(0)
    spec = dataclasses.replace(tiny_spec(), clip_sample=clip)
    teacher = DiffusionPolicy(spec)
    for p in teacher.denoiser.parameters():  # large outputs: the clips bind
        p.data.mul_(3.0)
    T = spec.diffusion_steps
    student = StudentPolicy(spec.obs_dim, spec.act_dim, T, steps=T, clip_steps=clip)
    student.net = TeacherStep(teacher)
    obs, noise = torch.randn(64, spec.obs_dim), torch.randn(64, T, spec.act_dim)
    with torch.no_grad():
        expected = teacher.sample(obs, noise)
        assert torch.allclose(student(obs, noise), expected, atol=1e-5)
        assert stepwise_loss(student, teacher, obs, noise).item() < 1e-10
        if clip:
            student.clip_steps = False
            assert not torch.allclose(student(obs, noise), expected, atol=1e-3)
            student.clip_steps = True
        student.net = torch.nn.Sequential(TeacherStep(teacher), Shift(0.3))  # every step a bit off
        assert stepwise_loss(student, teacher, obs, noise).item() > 1e-3


class Shift(torch.nn.Module):
    def __init__(self, by):
        super().__init__()
        self.by = by

    def forward(self, x):
        return x + self.by


def test_student_steps_are_bounded_by_the_teachers():
    spec = tiny_spec()
    with pytest.raises(ValueError, match="student steps must be in 1..4"):
        StudentPolicy(spec.obs_dim, spec.act_dim, spec.diffusion_steps, steps=5)


def test_ot_pairing_sorts_in_one_dimension_and_minimises_the_cost_in_several():
    g = torch.Generator().manual_seed(0)
    noise, samples = torch.randn(3, 6, 1, generator=g), torch.randn(3, 6, 1, generator=g)
    paired = ot_pairing(noise, samples)
    for s in range(3):  # the i-th smallest noise gets the i-th smallest sample
        assert torch.equal(paired[s, noise[s, :, 0].argsort(), 0], samples[s, :, 0].sort().values)
    noise, samples = torch.randn(2, 5, 2, generator=g), torch.randn(2, 5, 2, generator=g)
    paired = ot_pairing(noise, samples)
    for s in range(2):
        best = min(sum(((noise[s, i] - samples[s, j]) ** 2).sum().item() for i, j in enumerate(perm))
                   for perm in itertools.permutations(range(5)))
        assert ((noise[s] - paired[s]) ** 2).sum().item() == pytest.approx(best, rel=1e-6)
        assert sorted(map(tuple, paired[s].tolist())) == sorted(map(tuple, samples[s].tolist()))


class CountingTeacher:
    """A stand-in DiffusionPolicy: action = obs[:, :1] + a_T (so each state's samples are known)."""

    class spec:
        obs_dim, act_dim, diffusion_steps = 2, 1, 3

    noise_shape = (3, 1)  # (T, act_dim), as DiffusionPolicy.noise_shape

    def sample(self, obs, noise):
        return obs[:, :1] + noise[:, 0]


def test_the_ot_training_set_pairs_each_state_s_noise_with_its_own_samples_in_sorted_order():
    states = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    index, a_T, partner = ot_dataset(CountingTeacher(), states, draws=8, gen=g, pairs=24)
    assert index.shape == (24,) and a_T.shape == partner.shape == (24, 1)  # 24 // 8 = 3 of the 4 states
    assert len(set(index.tolist())) == 3
    for s in set(index.tolist()):
        rows = index == s
        z, y = a_T[rows, 0], partner[rows, 0]
        assert ((y - states[s, 0]).abs() < 6).all()  # the state's own samples, not another state's
        assert torch.equal(y[z.argsort()], y.sort().values)  # monotone: the quantile map


def test_a_concave_loss_takes_a_mode_where_the_absolute_error_is_indifferent():
    targets = torch.tensor([[-1.0], [1.0]])
    loss = {p: {x: bounded_regression_loss(torch.full((2, 1), x), targets, p).item() for x in (-1.0, 0.0)}
            for p in (0.5, 1.0, 2.0)}
    assert loss[0.5][-1.0] < loss[0.5][0.0] - 0.2  # concave: a mode beats the midpoint
    assert loss[1.0][-1.0] == pytest.approx(loss[1.0][0.0])  # absolute error: every point between ties
    assert loss[2.0][0.0] < loss[2.0][-1.0]  # squared error: the midpoint wins
    raw = torch.zeros(3, 1, requires_grad=True)
    bounded_regression_loss(raw, torch.tensor([[0.0], [1.0], [-1.0]]), 0.5).backward()
    assert torch.isfinite(raw.grad).all()  # an exact hit (error 0) has a finite slope


def test_a_map_of_the_initial_noise_ignores_the_later_noise():
    torch.manual_seed(0)
    student = StudentPolicy(3, 2, 4, steps=1, hidden_dim=16, all_noise=False)
    obs, noise = torch.randn(8, 3), torch.randn(8, 4, 2)
    other = noise.clone()
    other[:, 1:] = torch.randn(8, 3, 2)
    assert torch.equal(student(obs, noise), student(obs, other))
    other[:, 0] += 1.0
    assert not torch.equal(student(obs, noise), student(obs, other))


@pytest.mark.parametrize("K", [2, 4])
def test_stepwise_distillation_lowers_the_loss_and_clips_between_steps(K):
    torch.manual_seed(0)
    teacher = DiffusionPolicy(tiny_spec())
    states = torch.randn(512, teacher.spec.obs_dim)
    student, losses = distill(teacher, states, student_steps=K, hidden_dim=32, iterations=300, batch_size=128,
                              progress=False, method="stepwise")
    assert student.clip_steps and student.all_noise
    assert sum(losses[-30:]) < 0.5 * sum(losses[:30])


def test_a_teacher_started_mixture_student_starts_from_the_teacher_and_trains_it_all():
    torch.manual_seed(0)
    teacher = DiffusionPolicy(tiny_spec())
    states = torch.randn(512, teacher.spec.obs_dim)
    start = MixtureStudent.from_teacher(teacher.denoiser, teacher.spec.diffusion_steps)
    student, losses = distill(teacher, states, iterations=200, batch_size=128, progress=False, method="mixture",
                              init="teacher", hidden_dim=8, num_layers=5, activation="relu")  # the teacher's shape wins
    assert [p.shape for p in student.parameters()] == [p.shape for p in start.parameters()]
    assert isinstance(student.standardize, torch.nn.Identity)  # it reads raw observations, as the teacher does
    assert not torch.equal(student.net[2].weight, start.net[2].weight)  # the trunk is trained too, not frozen
    assert sum(losses[-20:]) < sum(losses[:20])


def test_the_last_step_sampler_finishes_the_teachers_own_chain():
    torch.manual_seed(0)
    teacher = DiffusionPolicy(tiny_spec())
    T, A = teacher.noise_shape

    class TeachersOwnA1(torch.nn.Module):  # a perfect first stage: the teacher's chain before its last step
        steps = 1

        def forward(self, obs, noise):
            return teacher.chain(obs, noise)[:, -2]

    sampler = TeacherLastStep(TeachersOwnA1(), teacher)
    obs, noise = 3 * torch.randn(256, teacher.spec.obs_dim), torch.randn(256, T, A)
    with torch.no_grad():
        assert torch.allclose(sampler(obs, noise), teacher.sample(obs, noise), atol=1e-6)
    assert not any(p.requires_grad for p in sampler.denoiser.parameters())  # the teacher's step is not trained


def test_last_step_draws_are_the_chain_before_its_last_step():
    torch.manual_seed(0)
    teacher = DiffusionPolicy(tiny_spec())
    states = torch.randn(64, teacher.spec.obs_dim)
    index, a_1 = teacher_draws(teacher, states, 2, torch.Generator().manual_seed(3), before_last=True)
    again, action = teacher_draws(teacher, states, 2, torch.Generator().manual_seed(3))
    assert torch.equal(index, again)
    gen = torch.Generator().manual_seed(3)
    expected_index = torch.randperm(64, generator=gen)[:64].repeat_interleave(2)
    noise = torch.randn(128, *teacher.noise_shape, generator=gen)
    with torch.no_grad():
        chain = teacher.chain(states[expected_index], noise)
    assert torch.equal(index, expected_index) and torch.allclose(a_1, chain[:, -2]) and torch.allclose(action, chain[:, -1])


def test_a_diverging_distillation_stops_with_a_clear_error():
    class NanTeacher(CountingTeacher):
        def sample(self, obs, noise):
            return torch.full((len(obs), 1), float("nan"))

    for method in ("mixture", "regression"):
        with pytest.raises(ValueError, match="diverged at iteration 1"):
            distill(NanTeacher(), torch.zeros(8, 2), iterations=5, batch_size=4, progress=False, method=method, draws=2)


@pytest.mark.parametrize("low, high", [([-1.0, -1.0], [1.0, 1.0]), ([-2.0, 0.0], [0.5, 4.0])])
def test_the_exported_policy_rescales_to_the_actuator_range_and_clips(low, high):
    class Fixed(torch.nn.Module):
        def forward(self, obs, noise):
            return torch.tensor([[-1.5, -1.0], [0.0, 0.5], [1.0, 2.0]])

    action = ActuatorPolicy(Fixed(), low, high)(torch.zeros(3, 1), torch.zeros(3, 2, 2))
    lo, hi = torch.tensor(low), torch.tensor(high)
    expect = lo + (torch.tensor([[-1.0, -1.0], [0.0, 0.5], [1.0, 1.0]]) + 1) / 2 * (hi - lo)
    assert torch.allclose(action, expect) and (action >= lo).all() and (action <= hi).all()


def test_jittered_copies_follow_the_states_and_move_each_dimension_by_its_own_spread():
    rng = np.random.default_rng(0)
    states = (rng.standard_normal((4000, 3)) * [1.0, 100.0, 0.0] + [0.0, 5.0, 7.0]).astype(np.float32)
    out = jittered(states, 2, 0.1, np.random.default_rng(1))
    assert out.shape == (12_000, 3) and out.dtype == np.float32
    assert np.array_equal(out[:4000], states)  # the visited states first, unchanged
    moved = (out[4000:] - np.tile(states, (2, 1))).std(axis=0)
    assert moved == pytest.approx([0.1, 10.0, 0.0], rel=0.05, abs=1e-6)  # a constant dimension stays put
    assert jittered(states, 0, 0.1, rng) is states
    with pytest.raises(ValueError, match=">= 0"):
        jittered(states, -1, 0.1, rng)
