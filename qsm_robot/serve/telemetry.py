"""Telemetry of the serving node: a per-tick flight recorder (saved as MCAP:
``serve/flight_record.py``), a whole-run latency histogram and the summary at exit
(ServeSummary). The latency histogram PNG needs matplotlib and is skipped (with a note) on a
robot computer without it: ``qsm-serve plot FILE.mcap`` draws it anywhere later."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from qsm_robot.serve import flight_record
from qsm_robot.serve.flight_record import FLAG_NAMES  # noqa: F401  (bit i of ``flags`` is TickFlag FLAG_NAMES[i])


class LatencyHistogram:
    """Whole-run latency distribution in fixed memory: 100 log-spaced bins per decade from 1 us to
    10 s (a bin is 2.3% wide), plus the exact maximum. Percentiles are read off bin upper edges."""

    PER_DECADE, DECADES = 100, 7

    def __init__(self):
        self.counts = np.zeros(self.PER_DECADE * self.DECADES + 1, np.int64)
        self.max_us = float("nan")
        self.n = 0

    def add(self, us: float) -> None:
        i = int(math.log10(us) * self.PER_DECADE) + 1 if us >= 1.0 else 0
        self.counts[min(i, len(self.counts) - 1)] += 1
        self.max_us = us if not self.max_us >= us else self.max_us
        self.n += 1

    def percentiles(self, qs=(50, 99, 99.9)) -> dict[str, float]:
        if self.n == 0:
            return {f"p{q}": float("nan") for q in qs} | {"max": float("nan")}
        cum = np.cumsum(self.counts)
        out = {}
        for q in qs:
            i = int(np.searchsorted(cum, q / 100 * self.n))
            out[f"p{q}"] = min(10 ** (i / self.PER_DECADE), self.max_us)
        return out | {"max": self.max_us}


class FlightRecorder(flight_record.TickRing):
    """The last ``capacity`` answered states, one row each, in a ring allocated (and touched) at
    start: memory stays flat however long the node runs. Whole-run counts live in ``total`` and
    ``latency`` (a LatencyHistogram). Saved as an MCAP flight record (``save``)."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int = 120_000):
        super().__init__(flight_record.node_dtype(obs_dim, act_dim), capacity)
        self.obs_dim, self.act_dim, self.dtype = obs_dim, act_dim, self.rows.dtype
        self.first_recv_ns = self.last_recv_ns = 0
        self.latency = LatencyHistogram()

    def add(self, t_recv_ns, t_send_ns, state_seq, state_t_ns, policy_us, node_state, flags, command, obs) -> None:
        r = self.next_row()
        r["t_recv_ns"], r["t_send_ns"], r["state_seq"], r["state_t_ns"] = t_recv_ns, t_send_ns, state_seq, state_t_ns
        r["policy_us"], r["node_state"], r["flags"] = policy_us, node_state, flags
        r["command"] = command
        r["obs"] = obs if obs is not None and obs.shape == (self.obs_dim,) else 0.0
        if self.total == 1:  # next_row() has counted this one
            self.first_recv_ns = t_recv_ns
        self.last_recv_ns = t_recv_ns
        self.latency.add((t_send_ns - t_recv_ns) / 1e3)

    def save(self, path: Path, **meta) -> Path:
        """Write the rows held as an MCAP flight record (atomically); ``meta`` (strings or JSON
        values) goes into its ``qsm_robot`` metadata record with the counts and flag names."""
        meta = {"obs_dim": self.obs_dim, "act_dim": self.act_dim, "flag_names": list(FLAG_NAMES),
                "total_ticks": self.total, "ticks_held": len(self.data),
                "latency_hist_counts": self.latency.counts.tolist(), **meta}
        return flight_record.write(path, "node", flight_record.node_messages(self.data), meta,
                                   flight_record.monotonic_to_unix_ns())


def percentiles(values: np.ndarray, qs=(50, 99, 99.9)) -> dict[str, float]:
    if len(values) == 0:
        return {f"p{q}": float("nan") for q in qs} | {"max": float("nan")}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs} | {"max": float(np.max(values))}


@dataclass
class ServeSummary:
    """What ``qsm-serve run`` writes at exit as ``summary-<time>.json`` (keys in this order) and the
    campaigns, the demo and the benchmarks read back (``ServeSummary.load``): whole-run counts."""

    wall_s: float
    """Seconds the node's loop ran."""
    states_answered: int
    """States answered with a command (ticks)."""
    mean_rate_hz: float
    """States answered per second, from the first answered state to the last."""
    profile_rate_hz: float
    """The profile's control rate."""
    node_latency_us: dict
    """State received -> command sent over the whole run: p50, p99, p99.9, max (µs, histogram bins)."""
    misses: int
    """Deadline misses (the policy did not finish inside the budget)."""
    over_budget: int
    """Policy commands sent after the budget (the policy was in time, the send was late)."""
    stale: int
    """Stale states, and periodic checks without a fresh state while RUNNING."""
    state_invalid: int
    """States that were NaN/Inf or of the wrong size."""
    obs_out_of_range: int
    """States outside the observation envelope."""
    action_invalid: int
    """Policy actions that were NaN/Inf or of the wrong size."""
    bounds_clamped: int
    """Commands clamped to the actuator bounds."""
    rate_clamped: int
    """Commands clamped by the rate limiter."""
    fallbacks: int
    """Fallback commands (the held or the safe command)."""
    malformed: int
    """Malformed messages on the state and control channels."""
    replayed: int
    """States dropped as replayed or out of order."""
    clock_jumps: int
    """States dropped as coming from the future."""
    resyncs: int
    """Re-syncs to the state stream."""
    safe_stops: int
    """Transitions to SAFE_STOP."""
    safe_stop_reasons: list
    """The reasons of the last (at most 20) safe-stops, oldest first."""
    internal_errors: int
    """Exceptions caught by the loop (each one puts the node in FAULT)."""
    injected_stalls: int
    """Policy calls stalled by fault injection (``--inject-spike-every``); 0 without it."""
    final_state: str
    """The node's state at exit (NodeState name)."""
    flight_record: str
    """Path of the flight record (.mcap)."""

    @classmethod
    def from_node(cls, node, wall_s: float, flight_record: Path | str) -> "ServeSummary":
        """The summary of a ServeNode that has stopped."""
        c, s = node.core.counters, node.core.safety.counts
        lat = node.core.latency_us(last=None)
        return cls(wall_s=round(wall_s, 3), states_answered=c.ticks, mean_rate_hz=round(node.core.answered_rate_hz(), 3),
                   profile_rate_hz=node.profile.rate_hz, node_latency_us={k: round(v, 1) for k, v in lat.items()},
                   misses=c.misses, over_budget=c.over_budget, stale=c.stale,
                   **{k: s[k] for k in ("state_invalid", "obs_out_of_range", "action_invalid", "bounds_clamped",
                                        "rate_clamped", "fallbacks")},
                   malformed=c.malformed, replayed=c.replayed, clock_jumps=c.clock_jumps, resyncs=c.resyncs,
                   safe_stops=c.safe_stops, safe_stop_reasons=list(c.reasons), internal_errors=c.errors,
                   injected_stalls=getattr(node.core.runner, "spikes", 0), final_state=node.core.state.name,
                   flight_record=str(flight_record))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "ServeSummary":
        """Raises ValueError naming the keys when ``data`` is not a summary of this version."""
        names = [f.name for f in fields(cls)]
        if missing := [k for k in names if k not in data]:
            raise ValueError(f"not a qsm-serve summary: missing keys {missing}")
        if unknown := sorted(set(data) - set(names)):
            raise ValueError(f"not a qsm-serve summary: unknown keys {unknown}")
        return cls(**data)

    @classmethod
    def load(cls, path: Path | str) -> "ServeSummary":
        return cls.from_dict(json.loads(Path(path).read_text()))


def plot_histogram(record_path: Path, png_path: Path | None = None) -> Path | None:
    """Latency histogram of a node's flight record (.mcap); None if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ticks = flight_record.node_ticks(record_path)
    node_us = (ticks["t_send_ns"] - ticks["t_recv_ns"]) / 1e3
    policy_us = ticks["policy_us"][np.isfinite(ticks["policy_us"])]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    bins = np.logspace(np.log10(max(1.0, min(node_us.min(initial=1), policy_us.min(initial=1)))),
                       np.log10(max(node_us.max(initial=10), policy_us.max(initial=10)) * 1.1), 80)
    ax.hist(node_us, bins=bins, alpha=0.6, label="state received -> command sent")
    if len(policy_us):
        ax.hist(policy_us, bins=bins, alpha=0.6, label="policy (onnxruntime)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("microseconds")
    ax.set_ylabel("ticks")
    ax.set_title(f"qsm-serve latency, {len(ticks)} ticks")
    ax.legend()
    fig.tight_layout()
    png_path = png_path or Path(record_path).with_suffix(".png")
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
