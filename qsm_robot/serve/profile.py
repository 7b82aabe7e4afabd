"""Deployment profiles: JSON files in deploy/profiles/, validated on load (no torch).

A profile is one robot/host setup: the robot's I/O description (``"policy"``: a
:class:`~qsm_robot.policy_io.PolicyIO`, the same JSON the model's contract carries), control rate,
latency budget, watchdog periods, safe command, rate limits and the ZeroMQ endpoints.
``check_contract`` refuses a model whose contract does not fit the profile, naming each mismatch.

Profile version 1 (task, obs_dim, act_dim, action_low, action_high as top-level keys) is refused
with the command that writes a version-2 profile from a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from qsm_robot.export.contract import ModelContract
from qsm_robot.policy_io import PERIOD_RTOL, PolicyIO, PolicyIOError

PROFILE_VERSION = 2
V1_KEYS = ("task", "obs_dim", "act_dim", "action_low", "action_high")
"""Top-level keys of a version-1 profile that version 2 moved into ``policy``."""


class ProfileError(ValueError):
    """An invalid profile, or a model that does not match it; the message names the field."""


def _realtime(data: Any, name: str, where: str) -> "RealtimeSettings":
    """A ``realtime`` section (absent or null: all off) as RealtimeSettings; ProfileError naming
    the section for anything but an object of known keys."""
    if data is None:
        return RealtimeSettings()
    if not isinstance(data, dict):
        raise ProfileError(f"profile {name!r}: {where}: must be an object, got {data!r}")
    unknown = sorted(set(data) - {f.name for f in fields(RealtimeSettings)})
    if unknown:
        raise ProfileError(f"profile {name!r}: {where}: unknown keys {unknown} (known: cpu_affinity, "
                           "sched_fifo_priority, mlockall)")
    return RealtimeSettings(**data)


def read_json(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The JSON in a file, or ``error`` saying why not (missing, unreadable, not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise error(f"{what} {path} is not valid JSON: {exc}") from None


@dataclass
class Endpoints:
    state: str = "tcp://127.0.0.1:5601"
    """Robot PUB -> node SUB: STATE messages."""
    command: str = "tcp://127.0.0.1:5602"
    """Node PUB -> robot SUB: COMMAND messages."""
    control: str = "tcp://127.0.0.1:5603"
    """Node ROUTER <- operator DEALER: ARM, DISARM, ESTOP, HEARTBEAT (status request) -> STATUS."""


@dataclass
class RealtimeSettings:
    """Real-time settings of a control loop's thread, applied when its loop starts
    (``serve/realtime.py``); each one the OS refuses is reported with the reason and the loop runs
    on without it. All off by default. docs/PROTOCOL.md ("Real-time settings") says what each does
    on a robot computer with isolated cores."""

    cpu_affinity: list[int] | None = None
    """CPUs the loop thread may run on (e.g. [3], an isolated core); null: wherever the OS puts it."""
    sched_fifo_priority: int | None = None
    """Run the loop thread under SCHED_FIFO at this priority, 1 to 99 (needs CAP_SYS_NICE or an
    rtprio limit); null: the default time-sharing scheduler."""
    mlockall: bool = False
    """Lock every page of the process in RAM, now and later (mlockall MCL_CURRENT | MCL_FUTURE):
    no page fault to disk during a tick (needs CAP_IPC_LOCK or an unlimited memlock limit)."""

    def problems(self) -> list[str]:
        """Each invalid field, named (empty when valid)."""
        out = []
        cpus = self.cpu_affinity
        if cpus is not None and not (isinstance(cpus, list) and cpus and len(set(cpus)) == len(cpus)
                                     and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus)):
            out.append(f"cpu_affinity: must be null or a non-empty list of distinct CPU numbers >= 0, got {cpus!r}")
        prio = self.sched_fifo_priority
        if prio is not None and not (isinstance(prio, int) and not isinstance(prio, bool) and 1 <= prio <= 99):
            out.append(f"sched_fifo_priority: must be null or an integer from 1 to 99, got {prio!r}")
        if not isinstance(self.mlockall, bool):
            out.append(f"mlockall: must be true or false, got {self.mlockall!r}")
        return out

    @property
    def is_default(self) -> bool:
        return self == RealtimeSettings()


@dataclass
class CurveSettings:
    """The ``curve`` section of a deployment profile. Relative paths are relative to the profile file."""

    server_secret_key: str
    """The node's key pair (a ``.key_secret`` file written by ``qsm-serve keygen``)."""
    server_public_key: str
    """The node's public key (``.key``): what robots and operators need to reach it."""
    allowed_clients: str
    """Folder of allowed clients' public keys (``*.key``); every other client is refused."""

    def resolve(self, base: Path) -> "CurveSettings":
        def path(p: str) -> str:
            return str(p if Path(p).is_absolute() else (base / p).resolve())

        return CurveSettings(path(self.server_secret_key), path(self.server_public_key), path(self.allowed_clients))


@dataclass
class RobotSettings:
    watchdog_periods: int = 5
    """The robot applies its safe command within this many periods of its last fresh command
    (at the last command cutoff inside that time)."""
    episode_steps: int | None = None
    """Control steps per simulated episode; null: the policy's episode_steps."""
    realtime: RealtimeSettings = field(default_factory=RealtimeSettings)
    """Real-time settings of the robot client's loop thread (on a shared host, give it other CPUs
    than the node's)."""


@dataclass
class Profile:
    name: str
    """The profile's name (calibration records are bound to it)."""
    policy: PolicyIO
    """The robot's I/O description: task, observation layout, actuator names and bounds, control
    period, action repeat, episode length. The model's contract must carry the same."""
    safe_command: list[float]
    """The command the node sends when it is not running (and as the 'safe' fallback)."""
    rate_hz: float | None = None
    """Control rate, 1 to 1000 Hz; null: the policy's (1 / policy.control_period_s)."""
    latency_budget_ms: float = 2.0
    """State-in to command-out budget of one tick; the policy must finish inside it."""
    check_control_period: bool = True
    """Refuse a model trained at another control period or action repeat, and a rate_hz other than
    the model's control rate (turn off only for timing benchmarks)."""
    stale_periods: int = 3
    """A state older than this many periods (or no new state for as long) is stale."""
    same_clock: bool = True
    """Robot and node read the same monotonic clock (one host) or PTP-synchronised clocks: a
    state's age is its transit time. false (separate hosts): the age is measured from the
    smallest transit seen since the robot's start, and a forged timestamp can make states look
    stale until the robot restarts (use CURVE)."""
    max_consecutive_misses: int = 10
    """Consecutive deadline misses that send the node to safe-stop."""
    max_consecutive_stale: int = 25
    """Consecutive stale or invalid states that send the node to safe-stop; with no state at
    all, safe-stop comes within stale_periods + max_consecutive_stale periods of the last one."""
    resync_after_rejected: int | None = None
    """States in a row rejected for their seq or their clock after which the node takes the next
    one as the stream's new reference (re-sync) and safe-stops. null: max_consecutive_stale, which
    decided this too before profiles had this key (so older profiles keep their behaviour)."""
    fallback: str = "hold"
    """On a miss or a bad state: 'hold' the last command or send the 'safe' command."""
    spin_us: float = 0.0
    """Busy-wait this long before (and after) a message is expected instead of sleeping: a core
    that went idle takes hundreds of microseconds to wake. 0 turns spinning off (saves CPU)."""
    max_delta_per_tick: list[float] | None = None
    """Per-actuator change limit per tick; null turns the rate limiter off. Default: 10% of the range."""
    soft_start_ticks: int = 0
    """After arming, the rate limit ramps up from soft_start_delta over this many ticks."""
    soft_start_delta: list[float] | None = None
    """Per-actuator change limit per tick at the start of the soft start."""
    obs_low: list[float] | None = None
    """Observation envelope (from calibration); outside it a state is flagged."""
    obs_high: list[float] | None = None
    """Upper side of the observation envelope."""
    obs_out_of_range_fallback: bool = False
    """Also send the fallback command when a state is outside the envelope."""
    require_calibration: bool = True
    """Refuse to serve without a calibration record (``qsm-serve calibrate``) for this model,
    profile and host. Turn off only for timing benchmarks and tests."""
    curve: CurveSettings | None = None
    """CURVE keys: when set, only clients with an allowed key can connect to any channel."""
    realtime: RealtimeSettings = field(default_factory=RealtimeSettings)
    """Real-time settings of the node's loop thread: CPU affinity, SCHED_FIFO priority, mlockall
    (applied at start; a refused one is a warning, never a failure)."""
    flight_record_ticks: int = 120_000
    """The flight recorder keeps the last this many ticks (memory fixed at start: 64 bytes a tick
    for cartpole); whole-run counters and the latency histogram cover every tick."""
    endpoints: Endpoints = field(default_factory=Endpoints)
    """ZeroMQ endpoints of the node's three sockets."""
    robot: RobotSettings = field(default_factory=RobotSettings)
    """Settings of the (simulated) robot."""
    profile_version: int = PROFILE_VERSION
    """Version of this file's layout."""

    def __post_init__(self) -> None:
        # null means "the policy's": resolved once here, so every reader sees a number.
        if self.rate_hz is None:
            self.rate_hz = self.policy.rate_hz
        if self.robot.episode_steps is None:
            self.robot = replace(self.robot, episode_steps=self.policy.episode_steps)

    # --- derived from policy: the names the node and the safety chain use ---
    @property
    def task(self) -> str:
        return self.policy.task

    @property
    def obs_dim(self) -> int:
        return self.policy.obs_dim

    @property
    def act_dim(self) -> int:
        return self.policy.act_dim

    @property
    def action_low(self) -> tuple[float, ...]:
        return self.policy.action_low

    @property
    def action_high(self) -> tuple[float, ...]:
        return self.policy.action_high

    @property
    def resync_threshold(self) -> int:
        """``resync_after_rejected``, or ``max_consecutive_stale`` where that is null."""
        return self.max_consecutive_stale if self.resync_after_rejected is None else self.resync_after_rejected

    @property
    def period_s(self) -> float:
        return 1.0 / self.rate_hz

    def validate(self) -> "Profile":
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ProfileError(f"profile {self.name!r}: {name}: {rule}, got {getattr(self, name, None)!r}")

        need(self.profile_version == PROFILE_VERSION, "profile_version", f"must be {PROFILE_VERSION}")
        need(isinstance(self.policy, PolicyIO), "policy", "must be a PolicyIO")
        need(isinstance(self.rate_hz, (int, float)) and 1 <= self.rate_hz <= 1000, "rate_hz", "must be in [1, 1000]")
        need(0 < self.latency_budget_ms * 1e-3 < self.period_s, "latency_budget_ms", "must be > 0 and below the period")
        for name in ("stale_periods", "max_consecutive_misses", "max_consecutive_stale"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.resync_after_rejected is None or self.resync_after_rejected >= 1, "resync_after_rejected",
             "must be null or >= 1")
        need(self.flight_record_ticks >= 1, "flight_record_ticks", "must be >= 1")
        need(self.soft_start_ticks >= 0, "soft_start_ticks", "must be >= 0")
        need(0 <= self.spin_us * 1e-6 < self.period_s / 2, "spin_us", "must be >= 0 and below half the period")
        need(self.fallback in ("hold", "safe"), "fallback", "must be 'hold' or 'safe'")
        for name in ("safe_command", "max_delta_per_tick", "soft_start_delta"):
            value = getattr(self, name)
            need(value is None or len(value) == self.act_dim, name, f"must have act_dim={self.act_dim} values")
        for name in ("obs_low", "obs_high"):
            value = getattr(self, name)
            need(value is None or len(value) == self.obs_dim, name, f"must have obs_dim={self.obs_dim} values")
        need((self.obs_low is None) == (self.obs_high is None), "obs_high", "obs_low and obs_high come together")
        low, high = np.array(self.action_low), np.array(self.action_high)
        safe = np.array(self.safe_command)
        need(bool(((safe >= low) & (safe <= high)).all()), "safe_command", "must lie within the actuator bounds")
        need(self.max_delta_per_tick is None or min(self.max_delta_per_tick) > 0, "max_delta_per_tick", "must be > 0")
        need(self.robot.watchdog_periods >= 1, "robot", "robot.watchdog_periods must be >= 1")
        need(self.robot.episode_steps >= 1, "robot", "robot.episode_steps must be >= 1")
        for where, settings in (("realtime", self.realtime), ("robot.realtime", self.robot.realtime)):
            if not isinstance(settings, RealtimeSettings):
                raise ProfileError(f"profile {self.name!r}: {where}: must be an object, got {settings!r}")
            for problem in settings.problems():
                raise ProfileError(f"profile {self.name!r}: {where}.{problem}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "policy": self.policy.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        if not isinstance(data, dict):
            raise ProfileError(f"a profile is a JSON object, got {type(data).__name__}")
        name = data.get("name", "?")
        version = data.get("profile_version", 1)  # version 1 did not write the key
        if version == 1:
            raise ProfileError(
                f"profile {name!r}: profile_version 1 (task, obs_dim, act_dim, action_low, action_high as "
                f"top-level keys) is no longer read; this qsm-robot reads profile_version {PROFILE_VERSION}, which "
                "embeds the robot's I/O description as \"policy\". Write a starting profile from the model with "
                "'qsm-serve profile --model MODEL.onnx --name NAME', then copy this profile's settings (rate, "
                "budget, safety limits, endpoints, keys) into it")
        if version != PROFILE_VERSION:
            raise ProfileError(f"profile {name!r}: profile_version: must be {PROFILE_VERSION}, got {version!r}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            moved = sorted(unknown & set(V1_KEYS))
            hint = f" ({', '.join(moved)}: part of \"policy\" since profile_version 2)" if moved else ""
            raise ProfileError(f"profile {name!r}: unknown keys {sorted(unknown)}{hint}")
        required = {"name", "policy", "safe_command"}
        if required - set(data):
            raise ProfileError(f"profile {name!r}: missing keys {sorted(required - set(data))}")
        data = dict(data)
        try:
            data["policy"] = PolicyIO.from_dict(data["policy"], where=f"profile {name!r}: policy")
        except PolicyIOError as exc:
            raise ProfileError(str(exc)) from None
        try:
            data["endpoints"] = Endpoints(**data.get("endpoints", {}))
            robot = data.get("robot", {})
            if not isinstance(robot, dict):
                raise ProfileError(f"profile {name!r}: robot: must be an object, got {robot!r}")
            robot = dict(robot)
            robot["realtime"] = _realtime(robot.get("realtime"), name, "robot.realtime")
            data["robot"] = RobotSettings(**robot)
            data["realtime"] = _realtime(data.get("realtime"), name, "realtime")
            if data.get("curve") is not None:
                data["curve"] = CurveSettings(**data["curve"])
            profile = cls(**data)
        except TypeError as exc:
            raise ProfileError(f"profile {name!r}: {exc}") from None
        if profile.max_delta_per_tick is None and "max_delta_per_tick" not in data:
            profile.max_delta_per_tick = [0.1 * (h - lo) for lo, h in zip(profile.action_low, profile.action_high)]
        return profile.validate()

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        profile = cls.from_dict(read_json(path, "profile", ProfileError))
        if profile.curve is not None:
            profile.curve = profile.curve.resolve(Path(path).parent)
        return profile

    def calibration_basis(self) -> dict[str, Any]:
        """The fields a calibration depends on: all but the name, endpoints, keys and bookkeeping."""
        skip = ("name", "endpoints", "curve", "require_calibration", "flight_record_ticks", "realtime")
        basis = {k: v for k, v in self.to_dict().items() if k not in skip}
        basis["robot"] = {k: v for k, v in basis["robot"].items() if k != "realtime"}  # the host's, like endpoints
        if basis["resync_after_rejected"] is None:  # as profiles before the key: their records stay valid
            del basis["resync_after_rejected"]
        return basis

    def fingerprint(self) -> str:
        """SHA-256 of ``calibration_basis()`` as canonical JSON."""
        return hashlib.sha256(json.dumps(self.calibration_basis(), sort_keys=True).encode()).hexdigest()


def check_contract(profile: Profile, contract: ModelContract) -> None:
    """Raise ProfileError listing every way the model does not fit the profile.

    The model's and the profile's I/O descriptions must agree field by field (task, observation
    names, order and sizes, actuator names, bounds; with ``check_control_period`` also the control
    period and action repeat, and the profile's rate must be the model's control rate).
    """
    model = contract.io
    problems = model.mismatches(profile.policy, check_period=profile.check_control_period)
    if profile.check_control_period and abs(profile.period_s - model.control_period_s) > PERIOD_RTOL * model.control_period_s:
        problems.append(f"rate_hz: model {model.rate_hz:g} Hz (control period {model.control_period_s * 1e3:.3f} ms), "
                        f"profile {profile.rate_hz:g} Hz (leave rate_hz null to follow the policy, or set "
                        "check_control_period false for a timing benchmark)")
    if problems:
        raise ProfileError(f"model does not match profile {profile.name!r}: " + "; ".join(problems))
