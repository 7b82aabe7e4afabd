"""One description of a policy's inputs and outputs, shared by every stage (no torch, no numpy).

:class:`PolicyIO` is declared once, by the environment (``make_env``), and then carried, never
re-typed: the checkpoint's ``policy.json`` stores it (``"io"``), the exported ONNX file's metadata
stores it (``qsm_robot.io``), a deployment profile embeds it (``"policy"``), and the serving node
and the robot client read it from there. A model meets a profile only if the two descriptions
agree field by field (:func:`PolicyIO.mismatches` names every difference).

JSON form (``to_dict``)::

    {"task": "walker-stand",
     "obs": [["height", 1], ["orientations", 14], ["velocity", 9]],
     "action_names": ["right_hip", ...], "action_low": [-1.0, ...], "action_high": [1.0, ...],
     "control_period_s": 0.025, "action_repeat": 1, "episode_steps": 1000,
     "io_version": 1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

IO_VERSION = 1
PERIOD_RTOL = 1e-6
"""Relative tolerance when comparing control periods (they come from float arithmetic)."""
BOUNDS_ATOL = 1e-6
"""Absolute tolerance when comparing actuator bounds."""


class PolicyIOError(ValueError):
    """A malformed I/O description; the message names the field."""


@dataclass(frozen=True)
class PolicyIO:
    """What goes into a policy and what comes out of it, in the robot's units."""

    task: str
    """dm_control task as domain-task, or any name a custom robot gives itself."""
    obs: tuple[tuple[str, int], ...]
    """(name, size) of each part of the flat float32 observation, in order."""
    action_names: tuple[str, ...]
    """One name per actuator (dm_control's actuator names; a<i> where the model has none)."""
    action_low: tuple[float, ...]
    """Actuator lower bounds: the policy's action -1 maps here."""
    action_high: tuple[float, ...]
    """Actuator upper bounds: the policy's action +1 maps here."""
    control_period_s: float
    """Seconds between two policy actions (the task's control step times action_repeat)."""
    action_repeat: int
    """Task control steps per policy action."""
    episode_steps: int
    """Policy steps in one episode before the time limit."""

    # --- derived ---
    @property
    def obs_dim(self) -> int:
        return sum(size for _, size in self.obs)

    @property
    def act_dim(self) -> int:
        return len(self.action_names)

    @property
    def rate_hz(self) -> float:
        return 1.0 / self.control_period_s

    @property
    def obs_layout(self) -> list[tuple[str, int, int]]:
        """(name, offset, size) of each observation part."""
        out, offset = [], 0
        for name, size in self.obs:
            out.append((name, offset, size))
            offset += size
        return out

    @property
    def obs_names(self) -> list[str]:
        """One name per observation element: ``key`` for a size-1 part, else ``key[i]``."""
        return [name if size == 1 else f"{name}[{i}]" for name, size in self.obs for i in range(size)]

    @property
    def frames_per_episode(self) -> int:
        return self.episode_steps * self.action_repeat

    # --- checks ---
    def validate(self) -> "PolicyIO":
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise PolicyIOError(f"policy I/O: {name}: {rule}, got {getattr(self, name)!r}")

        need(isinstance(self.task, str) and bool(self.task), "task", "must be a non-empty string")
        need(len(self.obs) >= 1 and all(isinstance(n, str) and n and isinstance(s, int) and s >= 1 for n, s in self.obs),
             "obs", "must be a non-empty list of [name, size >= 1]")
        need(len({n for n, _ in self.obs}) == len(self.obs), "obs", "names must be unique")
        need(len(self.action_names) >= 1 and all(isinstance(n, str) and n for n in self.action_names),
             "action_names", "must be a non-empty list of names")
        need(len(set(self.action_names)) == len(self.action_names), "action_names", "must be unique")
        for name in ("action_low", "action_high"):
            values = getattr(self, name)
            need(len(values) == self.act_dim, name, f"must have one value per actuator ({self.act_dim})")
            need(all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), name, "must be finite numbers")
        need(all(lo < hi for lo, hi in zip(self.action_low, self.action_high)), "action_high",
             "must be above action_low for every actuator")
        need(isinstance(self.control_period_s, (int, float)) and 0 < self.control_period_s <= 60,
             "control_period_s", "must be in (0, 60] seconds")
        need(isinstance(self.action_repeat, int) and self.action_repeat >= 1, "action_repeat", "must be an integer >= 1")
        need(isinstance(self.episode_steps, int) and self.episode_steps >= 1, "episode_steps", "must be an integer >= 1")
        return self

    def mismatches(self, other: "PolicyIO", mine: str = "model", theirs: str = "profile",
                   check_period: bool = True) -> list[str]:
        """Every field in which ``other`` differs from this description, as readable lines."""
        out = []

        def differ(field: str, a: Any, b: Any) -> None:
            out.append(f"{field}: {mine} {a!r}, {theirs} {b!r}")

        if self.task != other.task:
            differ("task", self.task, other.task)
        if self.obs != other.obs:
            differ("obs (names, order, sizes)", [list(o) for o in self.obs], [list(o) for o in other.obs])
        if self.action_names != other.action_names:
            differ("action_names", list(self.action_names), list(other.action_names))
        for field in ("action_low", "action_high"):
            a, b = getattr(self, field), getattr(other, field)
            if len(a) != len(b) or any(abs(x - y) > BOUNDS_ATOL for x, y in zip(a, b)):
                differ(field, list(a), list(b))
        if check_period:
            if abs(self.control_period_s - other.control_period_s) > PERIOD_RTOL * self.control_period_s:
                differ("control_period_s", self.control_period_s, other.control_period_s)
            if self.action_repeat != other.action_repeat:
                differ("action_repeat", self.action_repeat, other.action_repeat)
        return out

    # --- JSON ---
    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "obs": [[n, s] for n, s in self.obs], "action_names": list(self.action_names),
                "action_low": list(self.action_low), "action_high": list(self.action_high),
                "control_period_s": self.control_period_s, "action_repeat": self.action_repeat,
                "episode_steps": self.episode_steps, "io_version": IO_VERSION}

    @classmethod
    def from_dict(cls, data: Any, where: str = "policy I/O") -> "PolicyIO":
        """Parse and validate; errors name ``where`` and the field."""
        if not isinstance(data, dict):
            raise PolicyIOError(f"{where}: must be a JSON object, got {type(data).__name__}")
        version = data.get("io_version", IO_VERSION)
        if version != IO_VERSION:
            raise PolicyIOError(f"{where}: io_version {version!r} is not supported (this qsm-robot reads {IO_VERSION})")
        fields = ("task", "obs", "action_names", "action_low", "action_high", "control_period_s", "action_repeat",
                  "episode_steps")
        missing = [f for f in fields if f not in data]
        unknown = sorted(set(data) - set(fields) - {"io_version"})
        if missing:
            raise PolicyIOError(f"{where}: missing keys {missing}")
        if unknown:
            raise PolicyIOError(f"{where}: unknown keys {unknown}")
        try:
            obs = tuple((str(n), s) for n, s in data["obs"])
            io = cls(task=data["task"], obs=obs, action_names=tuple(data["action_names"]),
                     action_low=tuple(float(v) for v in data["action_low"]),
                     action_high=tuple(float(v) for v in data["action_high"]),
                     control_period_s=data["control_period_s"], action_repeat=data["action_repeat"],
                     episode_steps=data["episode_steps"])
        except (TypeError, ValueError) as exc:
            raise PolicyIOError(f"{where}: malformed value ({exc})") from None
        try:
            return io.validate()
        except PolicyIOError as exc:
            raise PolicyIOError(f"{where}: {str(exc).removeprefix('policy I/O: ')}") from None
