"""The few-step student and its distillation from the T-step teacher.

Method: regression onto teacher samples that share the student's noise. The teacher's DDPM
chain is a deterministic function of (obs, noise) once all of its noise, a_T and the T-1
per-step z, is an input (``ddpm_sample``). The student takes that same noise tensor [B, T, act]
and is trained so that student(s, noise) = teacher(s, noise). So it reproduces the teacher's
*distribution* (stochastic, possibly multi-modal: the noise picks the mode), not only its mean,
and parity and return retention can be checked sample by sample on shared noise.

The student runs K steps of one MLP (ReLU by default): a_K = noise[:, 0];
a_{k-1} = MLP([a_k, s, noise, onehot(k)]); the action is clip(a_0, -1, 1).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from qsm_robot.export.mixture import MixtureStudent, censored_mixture_nll
from qsm_robot.qsm.networks import Mish
from qsm_robot.qsm.policy import DiffusionPolicy
from qsm_robot.qsm.sampler import ddpm_sample, reverse_mean


# The student's activation is free (it need not be the teacher's Mish): ReLU fuses into the
# Gemm in onnxruntime, while Mish exports as seven elementwise nodes.
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "mish": Mish}


def activation_class(name: str) -> type[nn.Module]:
    """The student activation called ``name`` (a key of :data:`ACTIVATIONS`), or ValueError."""
    if name not in ACTIVATIONS:
        raise ValueError(f"student activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class StudentPolicy(nn.Module):
    """K-step student: (obs [B, obs_dim], noise [B, T, act_dim]) -> action in [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, teacher_steps: int, steps: int = 1,
                 hidden_dim: int = 256, num_layers: int = 2, activation: str = "relu", clip_steps: bool = False,
                 all_noise: bool = True):
        super().__init__()
        act = activation_class(activation)
        if not 1 <= steps <= teacher_steps:
            raise ValueError(f"student steps must be in 1..{teacher_steps} (the teacher's T), got {steps}")
        self.obs_dim, self.act_dim, self.teacher_steps, self.steps = obs_dim, act_dim, teacher_steps, steps
        self.clip_steps = clip_steps
        self.all_noise = all_noise  # False: the student sees a_T only (a map of the initial noise)
        dims = [act_dim + obs_dim + (teacher_steps * act_dim if all_noise else 0) + steps] + [hidden_dim] * num_layers
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), act()]
        layers.append(nn.Linear(hidden_dim, act_dim))
        self.net = nn.Sequential(*layers)
        self.register_buffer("step_codes", torch.eye(steps))

    def step(self, a: torch.Tensor, obs: torch.Tensor, flat_noise: torch.Tensor, k: int) -> torch.Tensor:
        """Student step k (K-1 first, 0 last): a_k -> a_{k-1} (before any clip), seeing all of the
        chain's noise ``flat_noise`` [B, T * act_dim] unless it is a map of a_T only."""
        code = self.step_codes[k].expand(obs.shape[0], self.steps)
        return self.net(torch.cat([a, obs, flat_noise, code] if self.all_noise else [a, obs, code], dim=-1))

    def raw(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The last step's output before the final clip (with ``clip_steps``, the ones between
        steps are clipped to [-1, 1], as the teacher clips its chain)."""
        flat = noise.reshape(noise.shape[0], self.teacher_steps * self.act_dim)
        a = noise[:, 0]
        for k in range(self.steps - 1, -1, -1):
            if self.clip_steps and k < self.steps - 1:
                a = a.clamp(-1.0, 1.0)
            a = self.step(a, obs, flat, k)
        return a

    def stretches(self) -> list[tuple[int, int, int]]:
        """(k, start, end) per student step: the stretch of the teacher's chain (indices into
        ``ddpm_sample(trajectory=True)``, 0 = a_T, T = the action) that step k covers, as even as
        the division of T by K allows."""
        bounds = [round(j * self.teacher_steps / self.steps) for j in range(self.steps + 1)]
        return [(self.steps - 1 - j, bounds[j], bounds[j + 1]) for j in range(self.steps)]

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.raw(obs, noise).clamp(-1.0, 1.0)


class TeacherSampler(nn.Module):
    """The teacher's full chain as a module with the student's signature."""

    def __init__(self, policy: DiffusionPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.policy.sample(obs, noise)


class TeacherLastStep(nn.Module):
    """(obs, noise) -> the teacher's own last denoising step (t = 0) applied to ``first``'s draw of a_1,
    the teacher's chain before that step: the ``mixture-last`` sampler.

    The teacher's last step adds no noise: its action is a fixed function of (s, a_1), and since the
    chain is clipped at every step, much of a_1 sits on the bounds, where that function puts narrow
    atoms *inside* the range (a reacher-easy teacher: spikes at -0.5 or 0.2 that a mixture of the
    action itself blurs, and the gate counts the blur as mass off the teacher's support). A mixture
    fits a_1's bound-heavy distribution well (its likelihood scores the mass on a bound), and the
    teacher's own step then puts each atom exactly where the teacher does, at the cost of one
    evaluation of the teacher's denoiser (README, "Faithful students")."""

    def __init__(self, first: nn.Module, teacher: DiffusionPolicy):
        super().__init__()
        self.first = first
        self.steps = first.steps  # the student's own network evaluations per action
        self.denoiser = copy.deepcopy(teacher.denoiser).requires_grad_(False)
        self.schedule = copy.deepcopy(teacher.schedule)
        with torch.no_grad():
            self.register_buffer("time_code", self.denoiser.encode_time(torch.zeros(1, dtype=torch.long))[0])

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a_1 = self.first(obs, noise)
        eps = self.denoiser.denoise(self.denoiser.encode_obs(obs), a_1, self.time_code)
        return reverse_mean(self.schedule, 0, a_1, eps).clamp(-1.0, 1.0)


class ActuatorPolicy(nn.Module):
    """What goes into the ONNX file: a sampler in [-1, 1], rescaled to actuator units and clipped."""

    def __init__(self, sampler: nn.Module, action_low: list[float], action_high: list[float]):
        super().__init__()
        self.sampler = sampler
        self.register_buffer("low", torch.tensor(action_low, dtype=torch.float32))
        self.register_buffer("high", torch.tensor(action_high, dtype=torch.float32))
        self.unit_box = bool((self.low == -1.0).all() and (self.high == 1.0).all())

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.sampler(obs, noise).clamp(-1.0, 1.0)
        if self.unit_box:  # the rescale is the identity (every dm_control task): four graph nodes fewer
            return a
        action = self.low + (a + 1.0) * 0.5 * (self.high - self.low)
        return torch.minimum(torch.maximum(action, self.low), self.high)


def bounded_regression_loss(raw: torch.Tensor, target: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """|error|^power to a target in [-1, 1]; where the target sits on a bound (the teacher's
    clip saturated), any raw output at or past that bound counts as exact. power 2 (squared
    error) averages across a jump of the teacher's noise-to-action map; power 1 (absolute error)
    takes one side of it (a median), which keeps the jump sharp where the targets agree; a power
    below 1 (concave) costs more between two targets than at either, so an output torn between
    two modes is pushed to one of them rather than left between."""
    err = raw - target
    err = torch.where(target >= 1.0, err.clamp(max=0.0), err)
    err = torch.where(target <= -1.0, err.clamp(min=0.0), err)
    size = err.abs() if power >= 1 else err.abs() + 1e-3  # |e|^p, p < 1, has an infinite slope at 0
    return (size ** power).mean()


def energy_score_loss(student_samples: torch.Tensor, teacher_samples: torch.Tensor) -> torch.Tensor:
    """The energy score of the student's samples against the teacher's, per state, averaged:
    E||X - Y|| - 1/2 E||X - X'|| with X, X' student and Y teacher samples ([S, m, act_dim] each).

    A strictly proper scoring rule (Gneiting & Raftery 2007): its expectation is smallest exactly
    when the student's distribution at each state is the teacher's, so the student learns the
    distribution (its modes included), not the mean of shared-noise targets (Shen & Meinshausen
    2023, "engression", train generative maps this way).
    """
    m = student_samples.shape[1]
    cross = torch.cdist(student_samples, teacher_samples).mean(dim=(1, 2))
    self_pairs = torch.cdist(student_samples, student_samples).sum(dim=(1, 2)) / (m * (m - 1))
    return (cross - 0.5 * self_pairs).mean()


METHODS = ("mixture", "mixture-last", "ot", "stepwise", "regression", "l1", "energy")
"""Distillation objectives: ``mixture`` (a mixture of Gaussians per state, one network evaluation,
fitted by maximum likelihood to a fixed set of teacher samples; the noise picks a component, then
a point in it: :mod:`qsm_robot.export.mixture`), ``mixture-last`` (the same mixture fitted to the
teacher's chain before its last step, a_1, then the teacher's own last step: :class:`TeacherLastStep`), ``ot`` (a map of the initial noise a_T only, regressed onto teacher
samples paired with its inputs by optimal transport, state by state, on a training set drawn once:
the monotone map from the Gaussian to the teacher's distribution; :func:`ot_dataset`),
``stepwise`` (shared noise; each student step regresses onto its
stretch of the teacher's chain, starting from the teacher's own state there, squared error),
``regression`` (shared noise, squared error on the final action only), ``l1`` (the same with
absolute error) or ``energy`` (the energy score on independent draws: the student learns the
distribution, not the teacher's noise-to-action pairing). With K=1 ``stepwise`` is ``regression``."""
MIXTURES = ("mixture", "mixture-last")
"""The methods whose student is a :class:`MixtureStudent` (K=1)."""
INITS = ("random", "teacher")
"""How a student's weights start: ``random`` (PyTorch's initialisation) or ``teacher`` (a mixture
student's hidden layers as the teacher's first denoising step: :meth:`MixtureStudent.from_teacher`)."""
DRAW_METHODS = ("mixture", "mixture-last", "ot", "energy")
"""The methods that learn from several teacher samples per state (``draws``); the others ignore it."""

DEFAULTS = {"iterations": 3000, "draws": 16}
"""Distillation iterations and samples per state (energy, ot) where a method has no default of its own."""
METHOD_DEFAULTS = {"ot": {"iterations": 20_000, "draws": 256}, "mixture": {"iterations": 40_000, "draws": 1},
                   "mixture-last": {"iterations": 40_000, "draws": 1}}
"""ot and mixture train on a fixed set (no teacher call per iteration: cheap iterations, and more
of them). The mixture's 40,000 (was 20,000): on the cartpole-swingup reference policy the student
underfit the swing-up, where the teacher's distribution moves fastest along the path (held-out
states of steps 50-119: 8-10% above W1 0.17 with 20,000 iterations, 4.5% with 40,000, none with
40,000 and the episode starts unjittered; two distillation seeds; README, "Faithful students").
ot needs many draws per state: with m draws the pairing puts each step between two modes at an
empirical quantile that is off by about 1/sqrt(m), and the student learns that blur. The
mixture's likelihood needs no pairing, so its set spreads over as many states as it can (one draw
at each of up to 2^19 states: qsm-export's states with their jittered copies, :func:`jittered`;
on a reacher-easy policy with 512 rollouts, held-out W1 0.071 and 5.2% off support, against 0.073
and 5.8% with 4 draws at each of 2^17 states: the same number of teacher samples)."""
OT_PAIRS = 2 ** 19
"""(state, draw) pairs in the fixed training set of ot and mixture: min(states available, OT_PAIRS // draws) states."""
OT_POWER = 0.5
"""ot's loss is |error|^0.5 (concave): between two modes it costs more than at either, so where the
pairing's targets disagree the student takes one mode instead of their average or median."""


def default_method(student_steps: int) -> str:
    """The distillation method when none is asked for: ``mixture`` for a one-evaluation student (the
    fewest samples off the teacher's support of every method measured, README "Faithful students"),
    ``regression`` for K > 1 (the mixture makes exactly one network evaluation)."""
    return "mixture" if student_steps == 1 else "regression"


def method_default(method: str, name: str) -> int:
    """The default ``iterations`` or ``draws`` of distillation ``method``."""
    return METHOD_DEFAULTS.get(method, {}).get(name, DEFAULTS[name])


def jittered(states: np.ndarray, copies: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``states`` [N, obs_dim] followed by ``copies`` copies of them, each state moved by Gaussian
    noise of ``scale`` x the states' per-dimension standard deviation.

    The teacher labels any state, so the student need not learn from the visited states alone: a
    trained policy's action distribution changes quickly with the state (walker-stand: the teacher
    at a state and at the same state moved by 0.03 of a standard deviation differ by W1/range
    0.05, more than the distribution gate allows), and between visited states the student has to
    guess. Measured on a walker-stand policy (mixture student, 24,000 states, held-out states; one
    distillation each): W1 0.127 without copies, 0.095 with 3 copies at 0.03, 0.100 with 3 at 0.1,
    0.109 with 10 at 0.03; more distillation iterations (60,000: 0.121) or other draw counts
    (4: 0.132, 64: 0.140) did not help. README, "Faithful students"."""
    if copies < 0 or scale < 0:
        raise ValueError(f"jitter copies and scale must be >= 0, got {copies} and {scale}")
    if copies == 0:
        return states
    spread = states.std(axis=0, keepdims=True) * scale
    moved = [states + spread * rng.standard_normal(states.shape) for _ in range(copies)]
    return np.concatenate([states, *moved]).astype(states.dtype)


def ot_pairing(noise: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """``samples`` [S, m, act] reordered so that samples[s, i] is the partner of noise[s, i] in the
    optimal transport (squared Euclidean cost) between the two sets of m points at each state s.

    For one action dimension this pairs them in sorted order (the quantile map); in several it is
    the discrete Brenier map, which keeps the joint distribution (minibatch OT couplings, as in
    Tong et al. 2023 and Pooladian et al. 2023 for flow matching)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(noise, samples).pow(2).cpu().numpy()
    order = torch.stack([torch.as_tensor(linear_sum_assignment(c)[1]) for c in cost])  # [S, m]
    return torch.gather(samples, 1, order[..., None].expand_as(samples).to(samples.device))


def teacher_draws(teacher: DiffusionPolicy, states: torch.Tensor, draws: int, gen: torch.Generator,
                  pairs: int = OT_PAIRS, before_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed training set of teacher samples: (state index [P], sample [P, act]), ``draws``
    independent samples at each of min(len(states), pairs // draws) states, grouped by state. With
    ``before_last`` a sample is the chain's a_1 (before its last step) instead of its action."""
    n = min(len(states), max(1, pairs // draws))
    index = torch.randperm(len(states), generator=gen)[:n].repeat_interleave(draws)
    draw = (lambda o, z: teacher.chain(o, z)[:, -2]) if before_last else teacher.sample
    with torch.no_grad():
        samples = torch.cat([draw(states[i], torch.randn(len(i), *teacher.noise_shape, generator=gen))
                             for i in index.split(8192)])
    return index, samples


def ot_dataset(teacher: DiffusionPolicy, states: torch.Tensor, draws: int, gen: torch.Generator,
               pairs: int = OT_PAIRS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ot method's training set, drawn once: (state index [P], a_T [P, act], partner [P, act]).

    At each state of :func:`teacher_draws`, ``draws`` initial noises a_T and the state's teacher
    samples are paired by :func:`ot_pairing`."""
    index, samples = teacher_draws(teacher, states, draws, gen, pairs)
    A = teacher.spec.act_dim
    n = len(index) // draws
    a_T = torch.randn(n, draws, A, generator=gen)
    partner = ot_pairing(a_T, samples.view(n, draws, A))
    return index, a_T.view(-1, A), partner.view(-1, A)


def stepwise_loss(student: StudentPolicy, teacher: DiffusionPolicy, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Each student step k from the teacher's chain at the start of its stretch to the teacher's
    chain at its end (teacher forcing), the mean over the K steps.

    Each stretch of a few teacher steps is a smooth map (one step is the denoiser, then the
    clip); the whole chain from a_T is not, since its noise picks a mode. Learning the short
    maps and composing them keeps the modes apart where one jump would average them."""
    spec = teacher.spec
    with torch.no_grad():
        chain = ddpm_sample(teacher.denoiser, teacher.schedule, obs, noise, spec.temperature, spec.clip_sample,
                            trajectory=True)  # [B, T+1, act]
    flat = noise.reshape(noise.shape[0], -1)
    losses = [bounded_regression_loss(student.step(chain[:, start], obs, flat, k), chain[:, end])
              for k, start, end in student.stretches()]
    return torch.stack(losses).mean()


def distill(
    teacher: DiffusionPolicy,
    states: torch.Tensor,
    student_steps: int = 1,
    hidden_dim: int = 256,
    num_layers: int = 2,
    activation: str = "relu",
    iterations: int | None = None,
    batch_size: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    method: str = "regression",
    draws: int | None = None,
    init: str = "random",
) -> tuple[StudentPolicy | MixtureStudent, list[float]]:
    """Train a K-step student on ``states`` [N, obs_dim]; returns it and the loss curve.

    ``method``: one of :data:`METHODS`; ``iterations`` and ``draws`` (samples per state for energy,
    ot and mixture): None takes :func:`method_default`. energy's batch is batch_size // draws states
    x draws samples; ot's and mixture's are batch_size rows of their fixed training sets
    (:func:`ot_dataset`, :func:`teacher_draws`). A mixture student has one step (K=1).

    ``init``: one of :data:`INITS`; ``teacher`` (mixture only) starts the student's hidden layers as
    the teacher's first denoising step (:meth:`MixtureStudent.from_teacher`), whose width, depth and
    activation then replace ``hidden_dim``, ``num_layers`` and ``activation``.

    ``teacher`` is a :class:`DiffusionPolicy` or anything with its ``spec``, ``noise_shape`` and
    ``sample(obs, noise)``, such as a :class:`~qsm_robot.qsm.selection.QSelectedPolicy` (whose
    noise is several chains': only the methods of :data:`DRAW_METHODS` learn from it)."""
    if method not in METHODS:
        raise ValueError(f"distillation method must be one of {', '.join(METHODS)}, got {method!r}")
    if init not in INITS:
        raise ValueError(f"student init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "teacher" and method not in MIXTURES:
        raise ValueError(f"--student-init teacher starts a mixture student from the teacher's first denoising step; "
                         f"--distill-method {method} has no such student: use --distill-method mixture")
    iterations = method_default(method, "iterations") if iterations is None else iterations
    draws = method_default(method, "draws") if draws is None else draws
    spec = teacher.spec
    T, A = spec.diffusion_steps, spec.act_dim
    if tuple(teacher.noise_shape) != (T, A) and method not in DRAW_METHODS:
        raise ValueError(f"distillation method {method} pairs the student's noise with the teacher's chain; this teacher "
                         f"draws {teacher.noise_shape[0] // T} chains per action: use one of {', '.join(DRAW_METHODS)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    diffusion = getattr(teacher, "policy", teacher)  # a QSelectedPolicy wraps the diffusion policy it selects from
    if method in MIXTURES:
        if student_steps != 1:
            raise ValueError(f"the mixture student makes one network evaluation per action; got {student_steps} steps")
        if init == "teacher":
            student = MixtureStudent.from_teacher(diffusion.denoiser, T)
        else:
            student = MixtureStudent(spec.obs_dim, A, T, hidden_dim=hidden_dim, num_layers=num_layers,
                                     activation=activation_class(activation))
            student.fit_input(states)
        if method == "mixture-last" and not spec.clip_sample:
            raise ValueError("--distill-method mixture-last fits the teacher's chain before its last step, which a teacher "
                             "without clip_sample leaves unbounded: use --distill-method mixture")
        fixed_index, fixed_target = teacher_draws(teacher, states, draws, gen, before_last=method == "mixture-last")
    else:
        student = StudentPolicy(spec.obs_dim, A, T, student_steps, hidden_dim, num_layers,
                                activation, clip_steps=method == "stepwise" and spec.clip_sample, all_noise=method != "ot")
    if method == "ot":
        fixed_index, ot_noise, fixed_target = ot_dataset(teacher, states, draws, gen)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / iterations)))
    losses = []
    bar = tqdm(range(iterations), desc="distilling", unit="it", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        if method in MIXTURES:
            pick = torch.randint(0, len(fixed_index), (batch_size,), generator=gen)
            loss = censored_mixture_nll(*student.mixture(states[fixed_index[pick]]), fixed_target[pick])
        elif method == "ot":
            pick = torch.randint(0, len(fixed_index), (batch_size,), generator=gen)
            noise = torch.zeros(batch_size, T, A)
            noise[:, 0] = ot_noise[pick]  # the only noise an a_T map reads
            loss = bounded_regression_loss(student.raw(states[fixed_index[pick]], noise), fixed_target[pick], OT_POWER)
        elif method == "energy":
            n_states = max(1, batch_size // draws)
            idx = torch.randint(0, states.shape[0], (n_states,), generator=gen)
            obs = states[idx].repeat_interleave(draws, 0)
            with torch.no_grad():  # independent noise: the teacher's draws are not paired with the student's
                noise = torch.randn(n_states * draws, *teacher.noise_shape, generator=gen)
                target = teacher.sample(obs, noise).view(n_states, draws, -1)
            student_noise = torch.randn(n_states * draws, T, A, generator=gen)
            loss = energy_score_loss(student(obs, student_noise).view(n_states, draws, -1), target)
        else:  # shared noise: regression, l1, stepwise
            idx = torch.randint(0, states.shape[0], (batch_size,), generator=gen)
            obs = states[idx]
            noise = torch.randn(batch_size, T, A, generator=gen)
            if method == "stepwise":
                loss = stepwise_loss(student, teacher, obs, noise)
            else:
                with torch.no_grad():
                    target = teacher.sample(obs, noise)
                loss = bounded_regression_loss(student.raw(obs, noise), target, 1.0 if method == "l1" else 2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise ValueError(f"distillation ({method}) diverged at iteration {len(losses)}: loss {losses[-1]}; "
                             "try a lower learning rate or another --distill-method")
        if len(losses) % 100 == 0:
            bar.set_postfix_str(f"loss {np.mean(losses[-100:]):.2e}")
    if method in MIXTURES:
        student.fold_input()
    if method == "mixture-last":
        return TeacherLastStep(student, diffusion).eval(), losses
    return student.eval(), losses
