"""The safety chain: what stands between the policy and the actuators, applied every tick.

Order (each step counted):
  1. state check     NaN/Inf or wrong size                 -> fallback command
  2. obs range       outside the profile/calibration range  -> flag (fallback if configured)
  3. action check    NaN/Inf or wrong size from the policy  -> fallback command
  4. bounds          clamp to the absolute actuator bounds
  5. rate limit      clamp the change from the previous command (on by default; tighter
                     during the soft-start ramp after arming)

The fallback command is the last command sent (``hold``) or the profile's safe command
(``safe``), and it passes steps 4 and 5 too. Only an e-stop or a safe-stop sends the safe
command unconditionally (``safe_command()``), since there stopping beats smoothness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qsm_robot.serve.protocol import TickFlag

COUNTERS = ("state_invalid", "obs_out_of_range", "action_invalid", "bounds_clamped", "rate_clamped", "fallbacks")


@dataclass
class SafetyConfig:
    obs_dim: int
    act_dim: int
    action_low: np.ndarray
    action_high: np.ndarray
    safe_command: np.ndarray
    max_delta: np.ndarray | None
    """Per-tick change limit per actuator; None turns the rate limiter off."""
    fallback: str = "hold"
    """'hold' the last command or go to the 'safe' command."""
    obs_low: np.ndarray | None = None
    obs_high: np.ndarray | None = None
    obs_out_of_range_fallback: bool = False
    soft_start_ticks: int = 0
    """After arming, the rate limit grows linearly from soft_start_delta to max_delta over this many ticks."""
    soft_start_delta: np.ndarray | None = None

    @classmethod
    def from_profile(cls, profile) -> "SafetyConfig":
        """The chain's settings from a deployment profile (with any calibration record applied)."""
        arr = lambda v: None if v is None else np.asarray(v, np.float32)  # noqa: E731
        return cls(obs_dim=profile.obs_dim, act_dim=profile.act_dim, action_low=arr(profile.action_low),
                   action_high=arr(profile.action_high), safe_command=arr(profile.safe_command),
                   max_delta=arr(profile.max_delta_per_tick), fallback=profile.fallback, obs_low=arr(profile.obs_low),
                   obs_high=arr(profile.obs_high), obs_out_of_range_fallback=profile.obs_out_of_range_fallback,
                   soft_start_ticks=profile.soft_start_ticks, soft_start_delta=arr(profile.soft_start_delta))


@dataclass
class TickResult:
    command: np.ndarray
    fallback: bool
    flags: int
    """TickFlag bits: what the chain found and did on this tick."""


@dataclass
class SafetyChain:
    cfg: SafetyConfig
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def __post_init__(self):
        self.last = self.cfg.safe_command.astype(np.float32).copy()
        self.ticks_since_arm = 10**9

    def arm(self) -> None:
        """Start the soft-start ramp from the current command."""
        self.ticks_since_arm = 0

    def safe_command(self) -> np.ndarray:
        self.last = self.cfg.safe_command.astype(np.float32).copy()
        return self.last.copy()

    def check_state(self, obs: np.ndarray) -> tuple[bool, int]:
        """Steps 1-2 on an observation: (usable, flags)."""
        flags = 0
        if obs.shape != (self.cfg.obs_dim,) or not np.isfinite(obs).all():
            self.counts["state_invalid"] += 1
            return False, TickFlag.STATE_INVALID
        if self.cfg.obs_low is not None:
            if ((obs < self.cfg.obs_low) | (obs > self.cfg.obs_high)).any():
                self.counts["obs_out_of_range"] += 1
                flags |= TickFlag.OBS_OUT_OF_RANGE
                if self.cfg.obs_out_of_range_fallback:
                    return False, flags
        return True, flags

    def _limit(self, command: np.ndarray, flags: int) -> tuple[np.ndarray, int]:
        c = self.cfg
        clamped = np.clip(command, c.action_low, c.action_high)
        if not np.array_equal(clamped, command):
            self.counts["bounds_clamped"] += 1
            flags |= TickFlag.BOUNDS_CLAMPED
        delta = c.max_delta
        if self.ticks_since_arm < c.soft_start_ticks and c.soft_start_delta is not None:
            frac = (self.ticks_since_arm + 1) / c.soft_start_ticks
            start = c.soft_start_delta
            delta = start + frac * ((c.max_delta if c.max_delta is not None else np.full_like(start, np.inf)) - start)
        if delta is not None:
            limited = np.clip(clamped, self.last - delta, self.last + delta)
            # Rounding can put last +- delta a hair outside the bounds: the bounds always win.
            limited = np.clip(limited, c.action_low, c.action_high)
            if not np.array_equal(limited, clamped):
                self.counts["rate_clamped"] += 1
                flags |= TickFlag.RATE_CLAMPED
            clamped = limited
        return clamped.astype(np.float32), flags

    def fallback_command(self, flags: int = 0) -> TickResult:
        self.counts["fallbacks"] += 1
        base = self.last if self.cfg.fallback == "hold" else self.cfg.safe_command.astype(np.float32)
        command, flags = self._limit(base.astype(np.float32), flags | TickFlag.FALLBACK)
        self.last = command
        self.ticks_since_arm += 1
        return TickResult(command.copy(), True, flags)

    def filter_action(self, action: np.ndarray, flags: int = 0) -> TickResult:
        """Steps 3-5 on a policy action (already decided usable state)."""
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (self.cfg.act_dim,) or not np.isfinite(action).all():
            self.counts["action_invalid"] += 1
            return self.fallback_command(flags | TickFlag.ACTION_INVALID)
        command, flags = self._limit(action, flags)
        self.last = command
        self.ticks_since_arm += 1
        return TickResult(command.copy(), False, flags)
