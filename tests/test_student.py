"""The stepwise student (qsm_robot/export/student.py): its stretches of the teacher's chain, the
teacher's own step form, and its loss against the teacher's chain."""

import dataclasses

import pytest
import torch
from test_export import tiny_spec

from qsm_robot.export.student import StudentPolicy, distill, stepwise_loss
from qsm_robot.qsm.policy import DiffusionPolicy


@pytest.mark.parametrize("T,K,expected", [
    (5, 1, [(0, 0, 5)]),
    (5, 5, [(4, 0, 1), (3, 1, 2), (2, 2, 3), (1, 3, 4), (0, 4, 5)]),
    (4, 2, [(1, 0, 2), (0, 2, 4)]),
    (6, 4, [(3, 0, 2), (2, 2, 3), (1, 3, 4), (0, 4, 6)]),
])
def test_stretches_cover_the_chain_in_order_without_gaps(T, K, expected):
    assert StudentPolicy(3, 1, T, steps=K).stretches() == expected


class TeacherEps(torch.nn.Module):
    """An oracle 'MLP' for a teacher-form student: reads (a, obs, noise, step code) from its input
    and returns the teacher's own denoiser output at t = k."""

    def __init__(self, teacher: DiffusionPolicy, obs_dim: int, act_dim: int):
        super().__init__()
        self.teacher, self.obs_dim, self.act_dim = teacher, obs_dim, act_dim

    def forward(self, x):
        T = self.teacher.spec.diffusion_steps
        a, obs = x[:, :self.act_dim], x[:, self.act_dim:self.act_dim + self.obs_dim]
        t = x[:, -T:].argmax(dim=-1)
        return self.teacher.denoiser(obs, a, t)


@pytest.mark.parametrize("clip", [True, False])
def test_the_teacher_form_with_the_teachers_denoiser_is_the_teachers_chain(clip):
    """Sample by sample on shared noise: the update, its per-step noise and its clips are the
    teacher's, so an exact eps gives the exact chain; and the stepwise loss is then 0."""
    torch.manual_seed(0)
    spec = dataclasses.replace(tiny_spec(), clip_sample=clip)
    teacher = DiffusionPolicy(spec)
    for p in teacher.denoiser.parameters():  # large outputs: the clips bind
        p.data.mul_(3.0)
    T, obs_dim, act_dim = spec.diffusion_steps, spec.obs_dim, spec.act_dim
    student = StudentPolicy(obs_dim, act_dim, T, steps=T, clip_steps=clip).take_teacher_form(teacher.schedule, 1.0)
    student.net = TeacherEps(teacher, obs_dim, act_dim)
    obs, noise = torch.randn(64, obs_dim), torch.randn(64, T, act_dim)
    with torch.no_grad():
        expected = teacher.sample(obs, noise)
        assert torch.allclose(student(obs, noise), expected, atol=1e-5)
        assert stepwise_loss(student, teacher, obs, noise).item() < 1e-10
        if clip:  # the clips matter: without them between steps the chain differs
            student.clip_steps = False
            assert not torch.allclose(student(obs, noise), expected, atol=1e-3)


def test_the_teacher_form_needs_one_student_step_per_teacher_step():
    spec = tiny_spec()
    with pytest.raises(ValueError, match="needs K = T"):
        StudentPolicy(spec.obs_dim, spec.act_dim, spec.diffusion_steps, steps=2).take_teacher_form(
            DiffusionPolicy(spec).schedule, 1.0)
    with pytest.raises(ValueError, match="student steps must be in 1..4"):
        StudentPolicy(spec.obs_dim, spec.act_dim, spec.diffusion_steps, steps=5)


@pytest.mark.parametrize("K", [2, 4])
def test_stepwise_distillation_lowers_the_loss_and_takes_the_teachers_form_at_k_equal_t(K):
    torch.manual_seed(0)
    teacher = DiffusionPolicy(tiny_spec())
    states = torch.randn(512, teacher.spec.obs_dim)
    student, losses = distill(teacher, states, student_steps=K, hidden_dim=32, iterations=300, batch_size=128,
                              progress=False, method="stepwise")
    assert (student.update is not None) == (K == teacher.spec.diffusion_steps)
    assert student.clip_steps
    assert sum(losses[-30:]) < 0.5 * sum(losses[:30])
