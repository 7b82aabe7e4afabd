"""The diffusion policy as a self-contained unit: denoiser, schedule and action bounds.

A checkpoint's policy part is two files, ``policy.safetensors`` (denoiser weights) and
``policy.json`` (everything else: see :class:`PolicySpec`). :func:`load_policy` reads them
with no training code, so export and other tools depend on this module alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qsm_robot.qsm.networks import Denoiser
from qsm_robot.qsm.sampler import ddpm_sample, sample_actions
from qsm_robot.qsm.schedules import DiffusionSchedule

POLICY_FORMAT = "qsm-robot/policy"
POLICY_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or of another format version."""


@dataclass
class PolicySpec:
    """Everything about a policy except its weights (stored as ``policy.json``)."""

    task: str
    obs_dim: int
    act_dim: int
    obs_layout: list
    """[[key, offset, size], ...]: the flat observation's order."""
    action_low: list[float]
    """Actuator lower bounds: the action -1 maps here."""
    action_high: list[float]
    """Actuator upper bounds: the action +1 maps here."""
    control_period_s: float
    action_repeat: int
    hidden_dim: int
    num_layers: int
    time_dim: int
    fourier_dim: int
    schedule: str
    diffusion_steps: int
    temperature: float
    clip_sample: bool
    step: int
    """Environment steps the policy was trained for."""
    format: str = POLICY_FORMAT
    format_version: int = POLICY_FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicySpec":
        if data.get("format") != POLICY_FORMAT:
            raise CheckpointError(f"not a qsm-robot policy (format {data.get('format')!r})")
        if data.get("format_version") != POLICY_FORMAT_VERSION:
            raise CheckpointError(
                f"policy format version {data.get('format_version')} is not supported "
                f"(this qsm-robot reads version {POLICY_FORMAT_VERSION}); use the qsm-robot "
                "release that wrote it"
            )
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise CheckpointError(f"policy.json lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in names})


class DiffusionPolicy(torch.nn.Module):
    """pi(a|s) as a DDPM over actions; ``act`` returns actions in [-1, 1]."""

    def __init__(self, spec: PolicySpec, denoiser: Denoiser | None = None):
        super().__init__()
        self.spec = spec
        self.denoiser = denoiser or Denoiser(
            spec.obs_dim, spec.act_dim, spec.hidden_dim, spec.num_layers, spec.time_dim, spec.fourier_dim
        )
        self.schedule = DiffusionSchedule(spec.schedule, spec.diffusion_steps)

    def sample(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Deterministic in (obs, noise); noise is [B, T, act_dim] standard normal."""
        return ddpm_sample(
            self.denoiser, self.schedule, obs, noise, self.spec.temperature, self.spec.clip_sample
        )

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A plain diffusion sample (the evaluation policy) for obs [B, obs_dim]."""
        return sample_actions(
            self.denoiser, self.schedule, obs, generator, self.spec.temperature, self.spec.clip_sample
        )

    def to_actuator(self, action: torch.Tensor) -> torch.Tensor:
        """Map actions in [-1, 1] to actuator units."""
        low = torch.as_tensor(self.spec.action_low, dtype=action.dtype, device=action.device)
        high = torch.as_tensor(self.spec.action_high, dtype=action.dtype, device=action.device)
        return low + (action + 1.0) * 0.5 * (high - low)


def save_policy_files(policy_dir: Path, spec: PolicySpec, denoiser: Denoiser) -> None:
    """Write ``policy.safetensors`` and ``policy.json`` into ``policy_dir`` (not atomic by itself)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    save_file(state, str(policy_dir / "policy.safetensors"))
    (policy_dir / "policy.json").write_text(json.dumps(asdict(spec), indent=2))


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory -> checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a run directory or a checkpoint directory")
    if (path / "policy.json").is_file():
        return path
    latest = path / "checkpoints" / "latest.json"
    if latest.is_file():
        try:
            name = json.loads(latest.read_text())["checkpoint"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{latest} is corrupt ({exc})") from exc
        return path / "checkpoints" / name
    raise CheckpointError(f"{path} holds no checkpoint (no policy.json, no checkpoints/latest.json)")


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> DiffusionPolicy:
    """Load the policy of a run directory or checkpoint directory onto ``device``."""
    ckpt = resolve_checkpoint(path)
    try:
        spec = PolicySpec.from_dict(json.loads((ckpt / "policy.json").read_text()))
        weights = load_file(str(ckpt / "policy.safetensors"), device=str(device))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read the policy in {ckpt}: {exc}") from exc
    policy = DiffusionPolicy(spec)
    try:
        policy.denoiser.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"policy weights in {ckpt} do not match policy.json: {exc}") from exc
    return policy.to(device).eval()
