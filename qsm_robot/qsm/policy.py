"""The diffusion policy as a self-contained unit: denoiser, schedule and action bounds.

A checkpoint's policy part is two files, ``policy.safetensors`` (denoiser weights) and
``policy.json`` (everything else: see :class:`PolicySpec`). :func:`load_policy` reads them
with no training code, so export and other tools depend on this module alone.

``policy.json`` (format version 2)::

    {"io": {...PolicyIO JSON: task, obs, action_names, bounds, period, repeat, episode_steps...},
     "hidden_dim": 256, "num_layers": 2, "time_dim": 16, "fourier_dim": 8, "schedule": "vp",
     "diffusion_steps": 5, "temperature": 1.0, "clip_sample": true, "step": 60000,
     "format": "qsm-robot/policy", "format_version": 2}

Format version 1 (qsm-robot before :class:`~qsm_robot.policy_io.PolicyIO`) held the I/O facts as
loose fields (``task``, ``obs_dim``, ``act_dim``, ``obs_layout``, ``action_low``, ``action_high``,
``control_period_s``, ``action_repeat``), without actuator names or episode length. It is read
through :func:`migrate_v1`: the I/O description is rebuilt from the task with
``make_env(task, action_repeat=...)`` (this needs dm_control), and every fact the file stored must
agree with the rebuilt one; if any disagrees, loading fails with a :class:`CheckpointError` naming
each difference. The file on disk is not rewritten: the next checkpoint of a resumed run is
written in version 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qsm_robot.policy_io import BOUNDS_ATOL, PERIOD_RTOL, PolicyIO, PolicyIOError
from qsm_robot.qsm.networks import Denoiser
from qsm_robot.qsm.sampler import ddpm_sample, sample_actions
from qsm_robot.qsm.schedules import DiffusionSchedule

POLICY_FORMAT = "qsm-robot/policy"
POLICY_FORMAT_VERSION = 2
V1_IO_FIELDS = ("task", "obs_dim", "act_dim", "obs_layout", "action_low", "action_high", "control_period_s",
                "action_repeat")
"""The I/O facts a version-1 policy.json stored as loose fields (replaced by ``io`` in version 2)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or of another format version."""


@dataclass
class PolicySpec:
    """Everything about a policy except its weights (stored as ``policy.json``)."""

    io: PolicyIO
    """The policy's inputs and outputs: task, observation layout, actuators and bounds, timing."""
    hidden_dim: int
    """Denoiser hidden width."""
    num_layers: int
    """Denoiser hidden layers."""
    time_dim: int
    """Width of the denoiser's diffusion-time embedding."""
    fourier_dim: int
    """Fourier features of the diffusion time."""
    schedule: str
    """Noise schedule: 'vp', 'linear' or 'cosine'."""
    diffusion_steps: int
    """T: steps of the reverse DDPM chain."""
    temperature: float
    """Scale of the chain's per-step noise."""
    clip_sample: bool
    """Clip the action to [-1, 1] after every step of the chain."""
    step: int
    """Environment steps the policy was trained for."""
    format: str = POLICY_FORMAT
    """Always ``qsm-robot/policy``."""
    format_version: int = POLICY_FORMAT_VERSION
    """Version of this file's layout (see the module docstring)."""

    # --- derived from io, not stored: the names the network and exporter code use ---
    @property
    def task(self) -> str:
        return self.io.task

    @property
    def obs_dim(self) -> int:
        return self.io.obs_dim

    @property
    def act_dim(self) -> int:
        return self.io.act_dim

    @property
    def action_low(self) -> tuple[float, ...]:
        return self.io.action_low

    @property
    def action_high(self) -> tuple[float, ...]:
        return self.io.action_high

    @property
    def action_repeat(self) -> int:
        return self.io.action_repeat

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``policy.json``."""
        return {**asdict(self), "io": self.io.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicySpec":
        if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"not a qsm-robot policy (format {got!r})")
        if data.get("format_version") == 1:
            data = migrate_v1(data)
        if data.get("format_version") != POLICY_FORMAT_VERSION:
            raise CheckpointError(
                f"policy format version {data.get('format_version')} is not supported "
                f"(this qsm-robot reads versions 1 and {POLICY_FORMAT_VERSION}); use the qsm-robot "
                "release that wrote it"
            )
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise CheckpointError(f"policy.json lacks {sorted(missing)}")
        try:
            io = PolicyIO.from_dict(data["io"], where="policy.json io")
        except PolicyIOError as exc:
            raise CheckpointError(str(exc)) from None
        return cls(**{k: data[k] for k in names - {"io"}}, io=io)


def migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 ``policy.json`` as version 2, or CheckpointError.

    The I/O description is rebuilt with ``make_env(task, action_repeat=...)``: a v1 file has no
    actuator names or episode length. Every fact the file did store (obs_dim, obs_layout, act_dim,
    action bounds, control period) must agree with the rebuilt description, so a checkpoint is
    never read against an environment that changed since it was written.
    """
    missing = [k for k in V1_IO_FIELDS if k not in data]
    if missing:
        raise CheckpointError(f"policy.json (format version 1) lacks {missing}")
    task, repeat = data["task"], data["action_repeat"]
    try:
        from qsm_robot.envs import env_info, make_env
    except ImportError as exc:
        raise CheckpointError(
            f"policy.json is format version 1: rebuilding its I/O description needs dm_control ({exc}); "
            "install the training extra (pip install '.[train]')") from None
    try:
        io = env_info(make_env(task, action_repeat=repeat))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"policy.json is format version 1 and its task cannot be rebuilt: {exc}") from None

    def bounds_differ(a: Any, b: tuple[float, ...]) -> bool:
        return len(a) != len(b) or any(abs(float(x) - y) > BOUNDS_ATOL for x, y in zip(a, b))

    rebuilt = {"obs_dim": io.obs_dim, "obs_layout": [list(part) for part in io.obs_layout], "act_dim": io.act_dim,
               "action_low": list(io.action_low), "action_high": list(io.action_high),
               "control_period_s": io.control_period_s}
    try:
        differ = {
            "obs_dim": data["obs_dim"] != io.obs_dim,
            "obs_layout": [list(part) for part in data["obs_layout"]] != rebuilt["obs_layout"],
            "act_dim": data["act_dim"] != io.act_dim,
            "action_low": bounds_differ(data["action_low"], io.action_low),
            "action_high": bounds_differ(data["action_high"], io.action_high),
            "control_period_s": abs(data["control_period_s"] - io.control_period_s) > PERIOD_RTOL * io.control_period_s,
        }
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"policy.json (format version 1) is malformed: {exc}") from None
    problems = [f"{k}: checkpoint {data[k]!r}, environment {rebuilt[k]!r}" for k, bad in differ.items() if bad]
    if problems:
        raise CheckpointError(
            f"policy.json is format version 1, and the facts it stored disagree with {task!r} (action_repeat "
            f"{repeat}) as this installation builds it: " + "; ".join(problems) + ". The environment changed "
            "since the checkpoint was written: load it with the qsm-robot and dm_control versions that wrote "
            "it, or train again")
    out = {k: v for k, v in data.items() if k not in V1_IO_FIELDS}
    return {**out, "io": io.to_dict(), "format_version": POLICY_FORMAT_VERSION}


class DiffusionPolicy(torch.nn.Module):
    """pi(a|s) as a DDPM over actions; ``act`` returns actions in [-1, 1]."""

    def __init__(self, spec: PolicySpec, denoiser: Denoiser | None = None):
        super().__init__()
        self.spec = spec
        self.denoiser = denoiser or Denoiser(
            spec.obs_dim, spec.act_dim, spec.hidden_dim, spec.num_layers, spec.time_dim, spec.fourier_dim
        )
        self.schedule = DiffusionSchedule(spec.schedule, spec.diffusion_steps)

    @property
    def noise_shape(self) -> tuple[int, int]:
        """The ``noise`` input of :meth:`sample` per state: (T, act_dim)."""
        return self.spec.diffusion_steps, self.spec.act_dim

    def sample(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Deterministic in (obs, noise); noise is [B, T, act_dim] standard normal."""
        return ddpm_sample(
            self.denoiser, self.schedule, obs, noise, self.spec.temperature, self.spec.clip_sample
        )

    def chain(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The whole chain of :meth:`sample` [B, T+1, act_dim]: a_T, then a after each step."""
        return ddpm_sample(
            self.denoiser, self.schedule, obs, noise, self.spec.temperature, self.spec.clip_sample, trajectory=True
        )

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A plain diffusion sample (the evaluation policy) for obs [B, obs_dim]."""
        return sample_actions(
            self.denoiser, self.schedule, obs, generator, self.spec.temperature, self.spec.clip_sample
        )

    @torch.no_grad()
    def decode(self, obs: torch.Tensor) -> torch.Tensor:
        """The chain's zero-noise decode for obs [B, obs_dim]: a_T = 0 and no noise between steps, one
        deterministic action per state (how SAC-family baselines evaluate: their mean action)."""
        return self.sample(obs, obs.new_zeros(obs.shape[0], self.schedule.T, self.spec.act_dim))

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
    (policy_dir / "policy.json").write_text(json.dumps(spec.to_dict(), indent=2))


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
