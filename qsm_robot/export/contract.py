"""The model contract stored in an exported ONNX file's metadata (no torch, no onnx needed).

Every key is ``qsm_robot.<field>`` and every value is JSON text. docs/EXPORT.md documents them.
A serving node compares the contract with its deployment profile and refuses a mismatch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONTRACT_FORMAT = "qsm-robot/onnx-policy"
CONTRACT_VERSION = 1
PREFIX = "qsm_robot."


class ContractError(ValueError):
    """Metadata that is missing, malformed or of another contract version."""


@dataclass
class ModelContract:
    """What an exported policy promises about its inputs and outputs."""

    task: str
    obs_dim: int
    obs_layout: list
    """[[key, offset, size], ...]: the order of the flat float32 observation."""
    act_dim: int
    action_low: list[float]
    """Actuator lower bounds; the output ``action`` is clipped to [action_low, action_high]."""
    action_high: list[float]
    control_period_s: float
    """Seconds between two actions the policy was trained at (physics step x action repeat)."""
    action_repeat: int
    sampler: str
    """'student' (distilled) or 'teacher' (the full DDPM chain)."""
    sampler_steps: int
    """Network evaluations per action: K for a student, T for the teacher."""
    teacher_steps: int
    """T of the teacher's DDPM chain."""
    schedule: str
    noise_shape: list
    """Shape of the ``noise`` input: ["batch", T, act_dim], standard normal float32."""
    teacher_sha256: str
    """SHA-256 of the teacher checkpoint's policy.json bytes followed by its policy.safetensors bytes."""
    teacher_step: int
    """Environment steps the teacher was trained for."""
    verification: dict = field(default_factory=dict)
    """The export's gate figures: parity, return retention, latency (see the report)."""
    format: str = CONTRACT_FORMAT
    format_version: int = CONTRACT_VERSION

    def to_metadata(self) -> dict[str, str]:
        return {PREFIX + k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "ModelContract":
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = PREFIX + f.name
            if key not in metadata:
                raise ContractError(f"model metadata lacks {key}: not a qsm-export model, or a damaged one")
            try:
                values[f.name] = json.loads(metadata[key])
            except ValueError as exc:
                raise ContractError(f"model metadata {key} is not JSON: {exc}") from None
        if values["format"] != CONTRACT_FORMAT:
            raise ContractError(f"model format {values['format']!r} is not {CONTRACT_FORMAT!r}")
        if values["format_version"] != CONTRACT_VERSION:
            raise ContractError(
                f"model contract version {values['format_version']} is not supported (this qsm-robot reads "
                f"version {CONTRACT_VERSION}); re-export the model with this release"
            )
        return cls(**values)
