"""The model contract stored in an exported ONNX file's metadata (no torch, no onnx needed).

Every key is ``qsm_robot.<field>`` and every value is JSON text; ``qsm_robot.io`` holds the
policy's :class:`~qsm_robot.policy_io.PolicyIO` (its ``to_dict`` form). docs/EXPORT.md documents
them. A serving node compares the contract with its deployment profile and refuses a mismatch.

Contract version 1 (before PolicyIO) stored the I/O facts as separate keys. It is refused, not
migrated: rebuilding the I/O description needs dm_control, which the serving path does not have;
re-exporting the model from its checkpoint writes version 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from qsm_robot.policy_io import PolicyIO, PolicyIOError

CONTRACT_FORMAT = "qsm-robot/onnx-policy"
CONTRACT_VERSION = 2
PREFIX = "qsm_robot."


class ContractError(ValueError):
    """Metadata that is missing, malformed or of another contract version."""


@dataclass
class ModelContract:
    """What an exported policy promises about its inputs and outputs."""

    io: PolicyIO
    """Task, observation layout, actuator names and bounds (the output ``action`` is clipped to
    [action_low, action_high]), control period, action repeat, episode length."""
    sampler: str
    """'student' (distilled) or 'teacher' (the full DDPM chain)."""
    sampler_steps: int
    """Network evaluations per action: K for a student, T for the teacher."""
    teacher_steps: int
    """T of the teacher's DDPM chain."""
    schedule: str
    """The teacher's noise schedule."""
    noise_shape: list
    """Shape of the ``noise`` input: ["batch", T, act_dim], standard normal float32."""
    teacher_sha256: str
    """SHA-256 of the teacher checkpoint's policy.json bytes followed by its policy.safetensors bytes,
    and, for a teacher that selects the best of N > 1 samples under the critics, the critics' tensors
    (``qsm_robot.export.exporter.teacher_sha256``)."""
    teacher_step: int
    """Environment steps the teacher was trained for."""
    verification: dict = field(default_factory=dict)
    """The export's gate figures: parity, return retention, latency (see the report)."""
    format: str = CONTRACT_FORMAT
    """Always ``qsm-robot/onnx-policy``."""
    format_version: int = CONTRACT_VERSION
    """Version of this metadata layout."""

    def to_metadata(self) -> dict[str, str]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["io"] = self.io.to_dict()
        return {PREFIX + k: json.dumps(v) for k, v in values.items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "ModelContract":
        def value(name: str) -> Any:
            key = PREFIX + name
            if key not in metadata:
                raise ContractError(f"model metadata lacks {key}: not a qsm-export model, or a damaged one")
            try:
                return json.loads(metadata[key])
            except ValueError as exc:
                raise ContractError(f"model metadata {key} is not JSON: {exc}") from None

        # Format and version first: an older file is named as such, not as one that lacks keys.
        if value("format") != CONTRACT_FORMAT:
            raise ContractError(f"model format {value('format')!r} is not {CONTRACT_FORMAT!r}")
        version = value("format_version")
        if version == 1:
            raise ContractError(
                "model contract version 1 (a qsm-export from before the shared I/O description) is not "
                f"supported: this qsm-robot reads version {CONTRACT_VERSION}. Re-export the model from its "
                "checkpoint with this release: qsm-export RUN_DIR --out MODEL.onnx (the serving side cannot "
                "migrate it: that needs the training environment)")
        if version != CONTRACT_VERSION:
            raise ContractError(
                f"model contract version {version} is not supported (this qsm-robot reads "
                f"version {CONTRACT_VERSION}); re-export the model with this release"
            )
        values = {f.name: value(f.name) for f in fields(cls)}
        try:
            values["io"] = PolicyIO.from_dict(values["io"], where=f"model metadata {PREFIX}io")
        except PolicyIOError as exc:
            raise ContractError(str(exc)) from None
        return cls(**values)
