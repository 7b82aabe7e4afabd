"""What must hold in any run of the node, checked on what the run leaves behind: the commands it
published, its flight record (``node_ticks``: one row a tick), its counters (a status reply, the
deltas of two, or its exit summary ``ServeSummary``). fuzz.py, faults.py and soak.py share them.

The ``*_problems`` functions return what is wrong, as text for a row's notes (an empty list: the
invariant holds); the tallies behind them (``flight_counts``, ``acted_on_stale``) are for the
tables too.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import numpy as np

from qsm_robot.serve import protocol as P

F = P.TickFlag


# --- the commands a node published ---------------------------------------------------------------
def command_problem(values: np.ndarray, low: np.ndarray, high: np.ndarray, seq: int) -> str | None:
    """What is wrong with one COMMAND's values: not one value per actuator, not finite, outside the
    profile's action bounds [low, high]; None if nothing."""
    if values.shape != low.shape:
        return f"command of {values.size} values (seq {seq})"
    if not np.isfinite(values).all():
        return f"non-finite command {values.tolist()} (seq {seq})"
    if ((values < low) | (values > high)).any():
        return f"command {values.tolist()} outside [{low.tolist()}, {high.tolist()}] (seq {seq})"
    return None


class RateCheck:
    """The rate limit (``max_delta_per_tick``) over a node's command stream: ``run()`` takes the
    growing list of (node t_ns, seq, ref, flags, values) and checks the commands added since its
    last call.

    Two consecutive commands of the node's stream (no seq missing) whose later one is not flagged
    SAFE (safe-stop and e-stop commands bypass the limit by design) may differ by at most the limit
    (``rate_viol``, of ``rate_checked`` pairs); pairs with a seq gap cannot be judged and are
    counted apart (``rate_unverified_exceed``). A finding, not a violation: commands answering a
    robot's consecutive seqs that differ by more (``robot_view_exceed``)."""

    def __init__(self, max_delta):
        self.max_delta = None if max_delta is None else np.asarray(max_delta, np.float64) + 1e-6
        self.prev = None
        self.by_ref: dict[tuple[int, int], tuple] = {}
        self.done = 0
        self.robot_starts: list[int] = []
        """Start time of each robot run: its seqs start again at 1."""

    def robot_run(self, t_ns: int) -> int:
        return bisect.bisect_right(self.robot_starts, t_ns)

    def run(self, cmds: list[tuple]) -> dict:
        out = dict(rate_viol=0, rate_checked=0, rate_unverified=0, rate_unverified_exceed=0, robot_view_exceed=0,
                   examples=[], robot_view_examples=[])
        new = cmds[self.done:]
        self.done += len(new)
        if self.max_delta is None:
            return out
        for cmd in new:
            t, seq, ref, flags, c = cmd
            if self.prev is not None and seq <= self.prev[1]:
                self.prev = None  # a restarted node counts from 1 again
            if self.prev is not None and not flags & int(P.CommandFlag.SAFE):
                pseq, pc = self.prev[1], self.prev[4]
                exceed = c.shape == pc.shape and bool((np.abs(c - pc) > self.max_delta).any())
                if seq == pseq + 1:  # none dropped between them
                    out["rate_checked"] += 1
                    if exceed:
                        out["rate_viol"] += 1
                        out["examples"].append(f"seq {pseq}->{seq}: {pc.tolist()} -> {c.tolist()}")
                else:
                    out["rate_unverified"] += 1
                    out["rate_unverified_exceed"] += exceed
            self.prev = cmd
            if ref == 0 or ref >= 2**31:  # answers no robot's seq: those start at 1 and grow one a period
                continue
            run = self.robot_run(t)
            before = self.by_ref.get((run, ref - 1))
            if before is not None and not flags & int(P.CommandFlag.SAFE) and before[4].shape == c.shape:
                if (np.abs(c - before[4]) > self.max_delta).any():
                    out["robot_view_exceed"] += 1
                    out["robot_view_examples"].append(f"ref {ref - 1}->{ref}: {before[4].tolist()} -> {c.tolist()}")
            self.by_ref[(run, ref)] = cmd
            if len(self.by_ref) > 4096:
                for k in sorted(self.by_ref)[:2048]:
                    del self.by_ref[k]
        return out


# --- the flight record ---------------------------------------------------------------------------
def tick_flags(ticks: np.ndarray) -> dict[str, np.ndarray]:
    """Per tick of a flight record, whether it was a deadline miss, answered by a fallback, on a
    stale state, or carried a stall that fault injection put there."""
    f = ticks["flags"].astype(np.int64)
    return {name: (f & int(flag)) > 0 for name, flag in
            (("miss", F.MISS), ("fallback", F.FALLBACK), ("stale", F.STALE), ("injected", F.INJECTED_STALL))}


def flight_counts(ticks: np.ndarray, since_ns: int | None = None) -> dict:
    """Misses, fallbacks and fresh policy commands in a flight record (from ``since_ns`` on)."""
    if since_ns is not None:
        ticks = ticks[ticks["t_recv_ns"] >= since_ns]
    flags = tick_flags(ticks)
    miss, fb = flags["miss"], flags["fallback"]
    running = ticks["node_state"] == int(P.NodeState.RUNNING)
    return {"ticks": int(len(ticks)), "misses": int(miss.sum()), "misses_with_fallback": int((miss & fb).sum()),
            "fallbacks": int(fb.sum()), "stale": int(flags["stale"].sum()),
            "policy_commands": int((running & ~fb).sum()), "running": int(running.sum())}


def fallback_problems(counts: dict) -> list[str]:
    """Every deadline miss answered by a fallback command, tick by tick (a ``flight_counts`` tally)."""
    unanswered = counts["misses"] - counts["misses_with_fallback"]
    return [f"{unanswered} misses without a fallback"] if unanswered else []


def acted_on_stale(ticks: np.ndarray, stale_ns: int) -> tuple[int, float]:
    """Policy commands (RUNNING, no fallback) that answered a state older than the staleness limit,
    by the state's true age (robot's send time to node's receipt: one clock on one host), and the
    oldest such age in ms."""
    age = ticks["t_recv_ns"] - ticks["state_t_ns"]
    acted = (ticks["node_state"] == int(P.NodeState.RUNNING)) & ~tick_flags(ticks)["fallback"]
    bad = acted & (age > stale_ns)
    return int(bad.sum()), float(age[bad].max() / 1e6) if bad.any() else 0.0


def computed_from(ticks: np.ndarray, obs: np.ndarray) -> int:
    """Ticks whose command the node computed from exactly this observation."""
    return int((ticks["obs"] == obs).all(axis=1).sum())


# --- the counters: status replies and the exit summary ------------------------------------------
def fallbacks_cover_misses(counts: dict) -> bool:
    """At least one fallback per deadline miss, in counters (a status reply's, their deltas over a
    window, an exit summary's)."""
    return counts["fallbacks"] >= counts["misses"]


def health_problems(summary: dict, states: Iterable[str] = ()) -> list[str]:
    """No internal error and never FAULT: the exit summary's count and final state, and the node
    states seen on the way (status replies), where given."""
    states = sorted(set(states))
    if not summary["internal_errors"] and summary["final_state"] != "FAULT" and "FAULT" not in states:
        return []
    return [f"internal errors {summary['internal_errors']}, final state {summary['final_state']}"
            + (f", states seen {states}" if states else "")]
