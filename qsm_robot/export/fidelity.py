"""Does the exported sampler keep the policy's action distribution? The distribution gate.

At each held-out state (observed in evaluation episodes, never used for distillation) both
samplers draw ``n`` actions with independent noise; per action dimension we compare the two
sample sets:

* **Wasserstein-1 distance** (``scipy.stats.wasserstein_distance``): how far, on average, the
  student's probability mass must move to become the teacher's, divided by the actuator's range
  so that one threshold fits every task. It needs no bins or kernel bandwidth, is in the units
  of the action, and sees a mode put in the wrong place in proportion to how far off it is
  (a total-variation or KL figure would call a mode 1% off as wrong as one on the far side).
* **Off-support fraction** (the mode check): the share of the student's samples farther than
  ``support_radius`` (a fraction of the range) from every teacher sample at that state: actions
  the teacher (almost) never takes, such as the average of "go left" and "go right".

Each figure is taken over action dimensions (the worst dimension counts) and reported as the
mean over states and the worst state. Both are 1-D (marginal) measures: cheap, standard and
readable; a joint mismatch that leaves every marginal intact escapes them (documented).

The noise floor (teacher against an independent draw of itself, same states, same sample count)
is measured in the same run, and the gate's thresholds are excesses over it: a student cannot be
told from the teacher below it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy.stats import wasserstein_distance

Sampler = Callable[[np.ndarray, np.random.Generator], np.ndarray]
"""(obs [n, obs_dim], rng) -> actions [n, act_dim] in actuator units, one independent draw per row."""


@dataclass(frozen=True)
class FidelityThresholds:
    """The gate's defaults (docs/ARCHITECTURE.md, "Faithful students", says how they were chosen).

    Each is an excess over the noise floor measured in the same run (the teacher against an
    independent draw of itself, same states and sample count): two finite sample sets of one
    distribution are never at distance 0, and the floor depends on the policy (a bang-bang policy's
    mode weights alone put ~0.04 of W1 between two draws of 256)."""

    w1_mean: float = 0.03
    """Mean over states of the worst dimension's W1 / range, above the floor's."""
    w1_worst: float = 0.10
    """The worst state's W1 / range, above the floor's worst."""
    off_support_mean: float = 0.02
    """Mean over states of the share of student samples where the teacher has no mass, above the floor's."""
    support_radius: float = 0.05
    """A student sample farther than this (fraction of the range) from every teacher sample is off support."""


@dataclass
class StateFidelity:
    w1: float
    """Worst dimension's W1 distance / actuator range."""
    off_support: float
    """Worst dimension's share of student samples off the teacher's support."""


def compare_at_state(teacher: np.ndarray, student: np.ndarray, span: np.ndarray, radius: float) -> StateFidelity:
    """Teacher and student samples [n, act_dim] at one state."""
    w1, off = 0.0, 0.0
    for i in range(teacher.shape[1]):
        t, s = teacher[:, i] / span[i], student[:, i] / span[i]
        w1 = max(w1, float(wasserstein_distance(t, s)))
        ts = np.sort(t)
        at = np.clip(np.searchsorted(ts, s), 1, len(ts) - 1)
        nearest = np.minimum(np.abs(s - ts[at - 1]), np.abs(s - ts[at]))
        off = max(off, float(np.mean(nearest > radius)))
    return StateFidelity(w1, off)


def measure(teacher: Sampler, student: Sampler, states: np.ndarray, low, high, samples: int = 512,
            seed: int = 0, thresholds: FidelityThresholds = FidelityThresholds()) -> dict:
    """The distribution gate over ``states`` [S, obs_dim]: figures, per-state values and pass/fail."""
    rng = np.random.default_rng(seed)
    span = np.asarray(high, np.float64) - np.asarray(low, np.float64)
    per_state, floor = [], []
    for s in states:
        obs = np.repeat(s[None].astype(np.float32), samples, 0)
        a_t, a_s, a_t2 = teacher(obs, rng), student(obs, rng), teacher(obs, rng)
        per_state.append(compare_at_state(a_t, a_s, span, thresholds.support_radius))
        floor.append(compare_at_state(a_t, a_t2, span, thresholds.support_radius))
    w1 = np.array([p.w1 for p in per_state])
    off = np.array([p.off_support for p in per_state])
    out = {
        "w1_mean": float(w1.mean()), "w1_worst": float(w1.max()), "worst_state": int(w1.argmax()),
        "off_support_mean": float(off.mean()), "off_support_worst": float(off.max()),
        "floor_w1_mean": float(np.mean([f.w1 for f in floor])), "floor_w1_worst": float(max(f.w1 for f in floor)),
        "floor_off_support_mean": float(np.mean([f.off_support for f in floor])),
        "states": len(states), "samples": samples, "thresholds": asdict(thresholds),
        "per_state_w1": [round(float(x), 4) for x in w1], "per_state_off_support": [round(float(x), 4) for x in off],
    }
    out["passed"] = bool(out["w1_mean"] <= out["floor_w1_mean"] + thresholds.w1_mean
                         and out["w1_worst"] <= out["floor_w1_worst"] + thresholds.w1_worst
                         and out["off_support_mean"] <= out["floor_off_support_mean"] + thresholds.off_support_mean)
    return out
