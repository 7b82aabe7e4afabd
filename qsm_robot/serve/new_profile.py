"""``qsm-serve profile``: a starting deployment profile written from a model's I/O description.

The profile takes every fact about the policy from the model (``PolicyIO``: task, observation
layout, actuator names and bounds, control period, episode length) and chooses the rest:

* rate: the model's control rate (``rate_hz`` left null: it follows the policy's period);
* safe command: per actuator, dm_control's "zero" action where 0 lies inside the bounds, else
  the midpoint of the bounds (each choice is reported);
* timing limits in time rather than periods, so that they make sense from 1 Hz to 1000 Hz:
  a state older than ~30 ms is stale (at least 2 periods), the robot's watchdog acts 2 periods
  after that, 100 ms of consecutive deadline misses and 250 ms of stale states (at least 3 of
  each) send the node to safe-stop; the latency budget starts at half the period, at most 2 ms,
  until ``qsm-serve calibrate`` measures it;
* loopback endpoints, no rate limiter and ``require_calibration: true``: calibration measures
  the envelope and a per-actuator command-change limit for this model on this host.

The user then edits the file; ``qsm-serve`` validates it on load.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from qsm_robot.policy_io import PolicyIO
from qsm_robot.serve.profile import PROFILE_VERSION

STALE_S = 0.030
"""A state older than this is stale (rounded up to whole periods, at least 2)."""
MISSES_S = 0.100
"""Consecutive deadline misses for this long send the node to safe-stop (at least 3)."""
STALE_RUN_S = 0.250
"""Consecutive stale or invalid states for this long send the node to safe-stop (at least 3)."""
MAX_INITIAL_BUDGET_MS = 2.0


def _periods(seconds: float, period_s: float, least: int) -> int:
    return max(least, math.ceil(seconds / period_s - 1e-9))


def safe_command(io: PolicyIO) -> tuple[list[float], str]:
    """(the safe command, a line saying how it was chosen for which actuators)."""
    command, zero, mid = [], [], []
    for name, lo, hi in zip(io.action_names, io.action_low, io.action_high):
        inside = lo <= 0.0 <= hi
        command.append(0.0 if inside else (lo + hi) / 2)
        (zero if inside else mid).append(name)
    parts = []
    if zero:
        parts.append(f"0 (dm_control's zero action, inside the bounds) for {_names(zero, io)}")
    if mid:
        parts.append(f"the midpoint of the bounds (0 lies outside them) for {_names(mid, io)}")
    return command, "; ".join(parts)


def _names(names: list[str], io: PolicyIO) -> str:
    return "every actuator" if len(names) == io.act_dim else ", ".join(names)


def dumps(data: dict[str, Any]) -> str:
    """JSON for a person to edit: indented, with each list of numbers or names on one line."""
    text = json.dumps(data, indent=2)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


def starting_profile(io: PolicyIO, name: str) -> tuple[dict[str, Any], list[str]]:
    """(a profile dict in the JSON form ``Profile.from_dict`` reads, notes on the choices made)."""
    period = io.control_period_s
    stale = _periods(STALE_S, period, 2)
    command, how = safe_command(io)
    profile = {
        "profile_version": PROFILE_VERSION,
        "name": name,
        "policy": io.to_dict(),
        "rate_hz": None,
        "latency_budget_ms": round(min(MAX_INITIAL_BUDGET_MS, 0.5 * period * 1e3), 3),
        "check_control_period": True,
        "require_calibration": True,
        "safe_command": command,
        "fallback": "hold",
        "stale_periods": stale,
        "max_consecutive_misses": _periods(MISSES_S, period, 3),
        "max_consecutive_stale": _periods(STALE_RUN_S, period, 3),
        "resync_after_rejected": _periods(MISSES_S, period, 3),
        "max_delta_per_tick": None,
        "soft_start_ticks": 0,
        "endpoints": {"state": "tcp://127.0.0.1:5601", "command": "tcp://127.0.0.1:5602",
                      "control": "tcp://127.0.0.1:5603"},
        "robot": {"watchdog_periods": stale + 2, "episode_steps": None},
    }
    notes = [f"rate {io.rate_hz:g} Hz (the model's control period {period * 1e3:g} ms)",
             f"safe command {command}: {how}",
             f"stale after {stale} periods, robot watchdog after {stale + 2}, safe-stop after "
             f"{profile['max_consecutive_misses']} misses or {profile['max_consecutive_stale']} stale states",
             "no rate limiter yet and require_calibration true: run qsm-serve calibrate next"]
    return profile, notes
