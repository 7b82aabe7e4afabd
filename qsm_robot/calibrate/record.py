"""Calibration records: ``calib/<name>.json``, written by ``qsm-serve calibrate``, required by
``qsm-serve run --calibration``. Standard library and numpy only: the serving node loads them.

A record is bound to one ONNX file (its SHA-256) and one deployment profile (its name and the
SHA-256 of the fields a calibration depends on, ``Profile.calibration_basis()``), and carries:

- ``latency``: the policy's latency distribution on this host and the budget proposed from it;
- ``envelope``: what closed-loop episodes showed of the observations and command changes;
- ``safety``: the values the node's safety chain uses: latency budget, observation envelope,
  per-tick command change limit. Only this section changes how the node behaves.

``CalibrationRecord.load`` validates the schema and names the first bad field;
``check(model_sha256, profile)`` names every way the record does not belong to this model and
profile; ``apply(profile)`` returns the profile with the record's safety values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsm_robot.files import atomic_write_text
from qsm_robot.serve.profile import read_json

SCHEMA_VERSION = 1


class CalibrationError(ValueError):
    """A record that is malformed, or that belongs to another model, profile or schema version."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class SafetyValues:
    """What the node's safety chain takes from the record."""

    latency_budget_ms: float
    """State-in to command-out budget of one tick (replaces the profile's)."""
    obs_low: list[float]
    """Per-dimension observation envelope: outside it a state is flagged ``obs_out_of_range``."""
    obs_high: list[float]
    max_delta_per_tick: list[float]
    """Per-actuator command change limit per tick for the rate limiter."""


@dataclass
class CalibrationRecord:
    name: str
    model: dict[str, Any]
    """``path``, ``sha256`` (of the ONNX file), and the contract's task, sampler and steps."""
    profile: dict[str, Any]
    """``name``, ``sha256`` (of the calibration basis) and ``basis`` (the fields themselves)."""
    safety: SafetyValues
    latency: dict[str, Any] = field(default_factory=dict)
    """Measurement: calls, pacing, percentiles (us), margin, proposed budget."""
    envelope: dict[str, Any] = field(default_factory=dict)
    """Measurement: episodes, ticks, returns, observed ranges and command changes, margins."""
    host: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    # --- validation --------------------------------------------------------------------------
    def validate(self) -> "CalibrationRecord":
        def need(ok: bool, where: str, rule: str) -> None:
            if not ok:
                raise CalibrationError(f"calibration record {self.name!r}: {where}: {rule}")

        def numbers(values, where: str, positive: bool = False) -> None:
            need(isinstance(values, list) and len(values) > 0, where, "must be a non-empty list of numbers")
            for v in values:
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), where,
                     f"must hold finite numbers, got {v!r}")
                need(not positive or v > 0, where, f"must be > 0, got {v!r}")

        need(isinstance(self.name, str) and re.fullmatch(r"[\w.-]+", self.name or "") is not None, "name",
             "must be a plain name (letters, digits, '.', '_', '-')")
        for section, keys in (("model", ("path", "sha256")), ("profile", ("name", "sha256", "basis"))):
            value = getattr(self, section)
            need(isinstance(value, dict), section, "must be an object")
            for key in keys:
                need(key in value, f"{section}.{key}", "is missing")
            need(re.fullmatch(r"[0-9a-f]{64}", str(value["sha256"])) is not None, f"{section}.sha256",
                 "must be 64 lower-case hex digits")
        s = self.safety
        need(isinstance(s.latency_budget_ms, (int, float)) and math.isfinite(s.latency_budget_ms)
             and s.latency_budget_ms > 0, "safety.latency_budget_ms", f"must be a number > 0, got {s.latency_budget_ms!r}")
        numbers(s.obs_low, "safety.obs_low")
        numbers(s.obs_high, "safety.obs_high")
        need(len(s.obs_low) == len(s.obs_high), "safety.obs_high", "must have as many values as safety.obs_low")
        need(all(lo < hi for lo, hi in zip(s.obs_low, s.obs_high)), "safety.obs_high", "must be above safety.obs_low")
        numbers(s.max_delta_per_tick, "safety.max_delta_per_tick", positive=True)
        return self

    @classmethod
    def from_dict(cls, data: Any, source: str = "record") -> "CalibrationRecord":
        if not isinstance(data, dict):
            raise CalibrationError(f"{source}: a calibration record is a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CalibrationError(f"{source}: schema_version: record has {version!r}, this qsm-robot reads "
                                   f"{SCHEMA_VERSION} (re-run qsm-serve calibrate)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(data) - names, {"name", "model", "profile", "safety"} - set(data)
        if unknown or missing:
            raise CalibrationError(f"{source}: " + "; ".join(
                ([f"unknown keys {sorted(unknown)}"] if unknown else []) + ([f"missing keys {sorted(missing)}"] if missing else [])))
        data = dict(data)
        try:
            data["safety"] = SafetyValues(**data["safety"])
            return cls(**data).validate()
        except TypeError as exc:
            raise CalibrationError(f"{source}: safety: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationRecord":
        return cls.from_dict(read_json(path, "calibration record", CalibrationError), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, then rename): a reader never sees half a record."""
        self.validate()
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def short_id(self) -> str:
        """First 6 hex digits of the SHA-256 of the record's canonical JSON (shown in status)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:6]

    # --- binding to a model and a profile ----------------------------------------------------
    def check(self, model_sha256: str, profile) -> None:
        """Raise CalibrationError naming every mismatch with this model file and profile."""
        problems = []
        if self.model["sha256"] != model_sha256:
            problems.append(f"model: the record is for sha256 {self.model['sha256'][:12]}... "
                            f"({self.model['path']}), this model is {model_sha256[:12]}...")
        if self.profile["name"] != profile.name:
            problems.append(f"profile: the record is for profile {self.profile['name']!r}, not {profile.name!r}")
        elif self.profile["sha256"] != profile.fingerprint():
            basis = profile.calibration_basis()
            changed = sorted(k for k in set(basis) | set(self.profile["basis"]) if basis.get(k) != self.profile["basis"].get(k))
            problems.append(f"profile: {profile.name!r} changed since calibration (fields {changed})")
        s = self.safety
        if len(s.obs_low) != profile.obs_dim:
            problems.append(f"safety.obs_low: {len(s.obs_low)} values, profile obs_dim {profile.obs_dim}")
        if len(s.max_delta_per_tick) != profile.act_dim:
            problems.append(f"safety.max_delta_per_tick: {len(s.max_delta_per_tick)} values, profile act_dim {profile.act_dim}")
        if problems:
            raise CalibrationError(f"calibration record {self.name!r} does not match: " + "; ".join(problems))

    def apply(self, profile):
        """The profile with this record's safety values (validated again)."""
        s = self.safety
        return dataclasses.replace(profile, latency_budget_ms=float(s.latency_budget_ms), obs_low=list(s.obs_low),
                                   obs_high=list(s.obs_high), max_delta_per_tick=list(s.max_delta_per_tick)).validate()
