"""Faults: kill -9 and restart of either node, and latency spikes beyond the budget.

    python -m campaigns.faults [--model deploy/models/cartpole-ref-k1.onnx]
                               [--profile deploy/profiles/cartpole-500hz.json] [--trials 3]

(from the repository root; ``python campaigns/faults.py`` works too). qsm-serve and qsm-sim run as
separate processes (the shipped commands, through harness.py) on a copy of the profile with
private ipc endpoints; the checks on their flight records and summaries are invariants.py's. Each fault is a function
``fault_*(model, work_dir, profile_path, ...) -> row`` (the tests call them on a small model):

1. kill -9 of qsm-serve mid-run: time from the kill to the robot applying its safe command
   (RobotReport.watchdog_trip_t_ns against the kill's time.monotonic_ns(): one clock, one host).
   Limit: robot.watchdog_periods periods.
2. kill -9 of qsm-sim mid-run: time from the kill to the node's SAFE_STOP, read by polling its
   control channel back to back (the transition lies between the send of the last poll that saw
   another state and the reply of the first that saw SAFE_STOP: that interval is the resolution).
   Limit: (stale_periods + max_consecutive_stale) periods: a state is stale after stale_periods
   periods without a fresh one, then each further period counts one stale tick, and
   max_consecutive_stale of them stop the node. Pass: the earliest the transition can have been
   is within the limit (the latest is shown too).
3. restart of qsm-sim after 2: a new qsm-sim on the same endpoints (its first state carries the
   restart flag), the node answers it with its safe command, the operator re-arms (ARM on the
   control channel, nothing else): time from ARM to RUNNING (limit stale_periods periods: the
   first fresh state after arming makes the node RUNNING), then fresh policy commands reach the
   new robot (its report: commands applied ~ steps, no watchdog trip after arming).
4. restart of qsm-serve after 1: a new ``qsm-serve --arm`` on the same endpoints while the robot
   stays on its safe command: time from the new node answering its control channel to the robot
   applying fresh commands again (RobotReport.watchdog_clear_t_ns). Limit: the robot's sockets
   retry a vanished node every ZeroMQ reconnect interval (100 ms by default, plus a random jitter
   of up to as much again), so 2 x 100 ms + robot.watchdog_periods periods. Also required: the
   new node RUNNING by itself a second later, policy commands on >= 90% of its last 0.5 s of
   ticks (after one ARM if it needed one: noted, and a failure).
   In 3 and 4, a policy command that answered a state older than stale_periods fails the row:
   on one host a state's true age is its receipt time minus its send time (one clock).
5. injected latency spikes (``--inject-spike-every N --inject-spike-ms 3x budget``): every stall
   is a deadline miss answered by a fallback command (summary JSON and flight record), no internal
   error, the node never in FAULT, the robot runs on without a watchdog trip.
6. a spike on every call: max_consecutive_misses misses in a row, then SAFE_STOP with the
   documented reason, no crash.

Prints a table (one row per fault), writes benchmarks/results/faults_<time>.csv (the work files,
flight records and robot reports stay in benchmarks/results/faults-<time>/), exits 1 on any
failure.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python campaigns/faults.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from campaigns.harness import (DEFAULT_MODEL, REPO, RESULTS, ControlClient, Drain, P, load_inputs, print_table,
                               private_profile, serve_summary, start_serve, start_sim, status, write_csv, write_json)
from campaigns.invariants import acted_on_stale, fallback_problems, flight_counts, health_problems, tick_flags
from qsm_robot.serve.flight_record import node_ticks
from qsm_robot.serve.profile import Profile

RECONNECT_MS = 100.0
"""ZeroMQ's default reconnect interval (ZMQ_RECONNECT_IVL): how often the robot's sockets retry a
node that went away; libzmq adds a random jitter of up to one interval to each retry."""
COLUMNS = ["fault", "measured", "limit", "limit_from", "result", "notes"]
DEFAULT_PROFILE = REPO / "deploy" / "profiles" / "cartpole-500hz.json"


class FaultError(RuntimeError):
    """A fault run that could not be carried out (a process died, a state never came)."""


# --- running the two nodes ------------------------------------------------------------------------
class Session:
    """One fault run: a private copy of the profile in ``work_dir`` and the processes started on
    it, all of which ``close()`` ends (SIGKILL to any still alive)."""

    def __init__(self, model: Path, work_dir: Path, profile_path: Path, **overrides):
        self.model, self.work = Path(model), Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.profile_path = private_profile(profile_path, self.work, **overrides)
        self.profile = Profile.load(self.profile_path)
        self.control = self.profile.endpoints.control
        self.period_ms = 1e3 / self.profile.rate_hz
        # More episodes than any run needs: every qsm-sim here ends by SIGTERM (it writes its report).
        self.scenario = write_json(self.work / "scenario.json", {"name": "faults", "seed": 0, "episodes": 10_000})
        self.drains: list[Drain] = []

    def serve(self, name: str, *extra: str) -> Drain:
        d = Drain(start_serve(self.model, self.profile_path, self.work / name, *extra))
        self.drains.append(d)
        return d

    def sim(self, name: str) -> Drain:
        d = Drain(start_sim(self.profile_path, self.scenario, self.work / f"{name}.json"))
        self.drains.append(d)
        return d

    def robot_report(self, name: str) -> dict:
        return json.loads((self.work / f"{name}.json").read_text())

    def serve_outputs(self, name: str) -> tuple[dict, np.ndarray]:
        """The summary JSON and the flight record's ticks that a qsm-serve wrote at SIGTERM."""
        (summary,) = (self.work / name).glob("summary-*.json")
        data = serve_summary(summary)
        return data, node_ticks(data["flight_record"])

    def check_alive(self) -> None:
        for d in self.drains:
            if getattr(d, "expect_alive", True) and d.proc.poll() is not None:
                _, err = d.wait()
                raise FaultError(f"{' '.join(d.proc.args[2:4])} exited with {d.proc.returncode}: {err.strip()[-600:]}")

    def close(self) -> None:
        for d in self.drains:
            if d.proc.poll() is None:
                d.proc.kill()
            d.wait(30)


def kill9(d: Drain) -> int:
    """SIGKILL a child; returns the monotonic time of the kill (taken just before the signal)."""
    d.expect_alive = False
    t = time.monotonic_ns()
    os.kill(d.proc.pid, signal.SIGKILL)
    d.wait(30)
    return t


def stop(*drains: Drain, timeout_s: float = 60.0) -> tuple[str, str]:
    """SIGTERM children (all at once, in this order) and wait for them: qsm-serve writes its flight
    record and summary, qsm-sim its report. Returns the first one's (stdout, stderr)."""
    for d in drains:
        d.expect_alive = False
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
    outs = [d.wait(timeout_s) for d in drains]
    for d, (_, err) in zip(drains, outs):
        if d.proc.returncode != 0:
            raise FaultError(f"{' '.join(d.proc.args[2:4])} exited with {d.proc.returncode} after SIGTERM: "
                             f"{err.strip()[-600:]}")
    return outs[0]


def wait_state(s: Session, want: set[str], timeout_s: float = 90.0, poll_s: float = 0.01) -> dict:
    """Poll the node (one connection) until its state is one of ``want``; fail early if a process died."""
    deadline = time.monotonic() + timeout_s
    st = {}
    client = ControlClient(s.control, timeout_s=0.5)
    try:
        while time.monotonic() < deadline:
            s.check_alive()
            try:
                st = client.send(P.MsgType.HEARTBEAT)
            except TimeoutError:
                continue
            if st["node_state"] in want:
                return st
            time.sleep(poll_s)
    finally:
        client.close()
    raise FaultError(f"the node did not reach {sorted(want)} within {timeout_s} s (last: {st.get('node_state')})")


def wait_answering(s: Session, min_ticks: int, timeout_s: float = 90.0) -> dict:
    """Poll the node until it has answered ``min_ticks`` more states than now."""
    start = status(s.control)["ticks"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s.check_alive()
        st = status(s.control)
        if st["ticks"] >= start + min_ticks:
            return st
        time.sleep(0.02)
    raise FaultError(f"the node answered fewer than {min_ticks} states in {timeout_s} s (the new robot's states are "
                     "not accepted?)")


def watch(control: str, want: str, since_ns: int, timeout_s: float) -> dict:
    """Poll the node's status back to back on one connection until its state is ``want``.

    Returns, in ms after ``since_ns``: ``upper`` (reply of the first poll in ``want``) and ``lower``
    (send of the last poll in another state; ``since_ns`` if none), the polls made and their mean
    round trip."""
    client = ControlClient(control, timeout_s=0.25)
    lower, rtts = since_ns, []
    try:
        while True:
            t0 = time.monotonic_ns()
            if (t0 - since_ns) / 1e9 > timeout_s:
                raise FaultError(f"the node did not reach {want} within {timeout_s:.2f} s")
            try:
                st = client.send(P.MsgType.HEARTBEAT)
            except TimeoutError:
                continue
            t1 = time.monotonic_ns()
            rtts.append(t1 - t0)
            if st["node_state"] == want:
                return {"upper_ms": (t1 - since_ns) / 1e6, "lower_ms": (lower - since_ns) / 1e6, "polls": len(rtts),
                        "rtt_ms": float(np.mean(rtts)) / 1e6, "status": st, "t_ns": t1}
            lower = t0
    finally:
        client.close()


def wait_ready_fast(s: Session, d: Drain, timeout_s: float = 90.0, attempt_s: float = 0.01) -> int:
    """Monotonic time of the first reply of a node that is starting: a fresh client every
    ``attempt_s`` (a client that found no listener would retry only after ZeroMQ's 100 ms).
    (harness.wait_ready would read the child's pipes, which a Drain already reads.)"""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s.check_alive()
        try:
            status(s.control, timeout_s=attempt_s)
            return time.monotonic_ns()
        except TimeoutError:
            continue
    raise FaultError(f"the new qsm-serve did not answer within {timeout_s} s")


def start_running(s: Session, serve_name: str = "rec", robot: str = "robot", run_s: float = 0.5,
                  serve_extra: tuple[str, ...] = (), want: set[str] = frozenset({"RUNNING"})) -> tuple[Drain, Drain, dict]:
    """qsm-serve --arm, then qsm-sim; returns once the node is in ``want`` and ``run_s`` later."""
    serve = s.serve(serve_name, *serve_extra)
    wait_ready_fast(s, serve, attempt_s=0.1)
    sim = s.sim(robot)
    st = wait_state(s, set(want))
    time.sleep(run_s)
    s.check_alive()
    return serve, sim, st


def notes(problems: list[str], info: str) -> str:
    """A row's notes: what failed (if anything), then what was seen."""
    return ("FAILED: " + "; ".join(problems) + " | " if problems else "") + info


def row(fault: str, ok: bool, measured: str, limit: str, limit_from: str, note: str = "", **values) -> dict:
    """A table row; ``pass`` (bool) and the numeric fields are for the tests and the CSV."""
    return {"fault": fault, "measured": measured, "limit": limit, "limit_from": limit_from,
            "result": "PASS" if ok else "FAIL", "notes": note, "pass": bool(ok), **values}


# --- the faults -----------------------------------------------------------------------------------
def fault_kill_serve(model: Path, work_dir: Path, profile_path: Path, run_s: float = 0.5, after_s: float = 0.3) -> dict:
    """kill -9 of qsm-serve while the robot runs: kill -> the robot's safe command."""
    s = Session(model, work_dir, profile_path)
    try:
        serve, sim, _ = start_running(s, run_s=run_s)
        t_kill = kill9(serve)
        time.sleep(after_s)
        s.check_alive()
        stop(sim)
        robot = s.robot_report("robot")
    finally:
        s.close()
    limit = s.profile.robot.watchdog_periods
    before = sum(t < t_kill for t in robot["watchdog_trip_t_ns"])
    after = [(t, n) for t, n in zip(robot["watchdog_trip_t_ns"], robot["watchdog_periods_to_safe"]) if t >= t_kill]
    if not after:
        return row("kill -9 qsm-serve", False, "no watchdog trip after the kill", f"{limit} periods",
                   "robot.watchdog_periods", f"trips before the kill: {before}", value_ms=None, value_periods=None)
    ms = (after[0][0] - t_kill) / 1e6
    periods = ms / s.period_ms
    ok = periods <= limit
    return row("kill -9 qsm-serve", ok, f"{ms:.2f} ms = {periods:.2f} periods to the robot's safe command",
               f"{limit} periods = {limit * s.period_ms:g} ms", "robot.watchdog_periods",
               f"robot's watchdog: {after[0][1]} ticks without a fresh command (it acts at the cutoff, 0.9 period "
               f"into the {limit}th tick after the last fresh command: nominally {limit - 0.1:g}-{limit + 0.9:g} "
               f"periods after a kill, by phase); trips before the kill (start-up): {before}",
               value_ms=round(ms, 3), value_periods=round(periods, 3), limit_periods=limit,
               watchdog_ticks=after[0][1], trips_before_kill=before)


def _kill_robot(s: Session, run_s: float) -> tuple[Drain, dict, float]:
    """Both nodes running, then kill -9 of qsm-sim; returns (serve, the SAFE_STOP watch, limit ms)."""
    serve, sim, _ = start_running(s, run_s=run_s)
    p = s.profile
    limit_ms = (p.stale_periods + p.max_consecutive_stale) * s.period_ms
    t_kill = kill9(sim)
    w = watch(s.control, "SAFE_STOP", t_kill, timeout_s=3 * limit_ms / 1e3 + 2.0)
    return serve, w, limit_ms


def fault_kill_robot(model: Path, work_dir: Path, profile_path: Path, run_s: float = 0.5) -> dict:
    """kill -9 of qsm-sim while the node runs: kill -> the node's SAFE_STOP."""
    s = Session(model, work_dir, profile_path)
    try:
        serve, w, limit_ms = _kill_robot(s, run_s)
        _, err = stop(serve)
    finally:
        s.close()
    p = s.profile
    m = re.search(r"RUNNING -> SAFE_STOP: (.*)", err)
    reason = m.group(1) if m else "no RUNNING -> SAFE_STOP in the node's log"
    node_ms = re.search(r"no fresh state for ([\d.]+) ms", reason)
    node_ms = float(node_ms.group(1)) if node_ms else None
    ok = w["lower_ms"] <= limit_ms and node_ms is not None
    res = w["upper_ms"] - w["lower_ms"]
    return row("kill -9 qsm-sim", ok,
               f"SAFE_STOP {w['lower_ms']:.1f}-{w['upper_ms']:.1f} ms after the kill "
               f"({w['lower_ms'] / s.period_ms:.1f}-{w['upper_ms'] / s.period_ms:.1f} periods)",
               f"{p.stale_periods + p.max_consecutive_stale} periods = {limit_ms:g} ms",
               f"stale_periods {p.stale_periods} + max_consecutive_stale {p.max_consecutive_stale}",
               f"poll resolution {res:.2f} ms ({w['polls']} polls, round trip {w['rtt_ms']:.2f} ms); node's log: {reason}",
               value_ms=round(w["lower_ms"], 3), upper_ms=round(w["upper_ms"], 3), resolution_ms=round(res, 3),
               limit_ms=limit_ms, node_reported_ms=node_ms, reason=reason)


def fault_restart_robot(model: Path, work_dir: Path, profile_path: Path, run_s: float = 0.5, after_s: float = 1.0,
                        min_applied: float = 0.95, min_policy: float = 0.9) -> dict:
    """After a kill -9 of qsm-sim and the node's SAFE_STOP: a new qsm-sim, ARM, RUNNING, fresh commands."""
    s = Session(model, work_dir, profile_path)
    try:
        serve, w_stop, _ = _kill_robot(s, run_s)
        s.sim("robot2")
        wait_answering(s, min_ticks=int(0.2 * s.profile.rate_hz))  # answered with the safe command (SAFE_STOP)
        t_arm = time.monotonic_ns()
        reply = status(s.control, P.MsgType.ARM)
        w = watch(s.control, "RUNNING", t_arm, timeout_s=5.0)
        time.sleep(after_s)
        end = status(s.control)
        s.check_alive()
        t_stop = time.monotonic_ns()
        _, err = stop(serve, s.drains[-1])
        robot = s.robot_report("robot2")
        summary, ticks = s.serve_outputs("rec")
    finally:
        s.close()
    p = s.profile
    limit_ms = p.stale_periods * s.period_ms
    fc = flight_counts(ticks, since_ns=t_arm)
    stale_acted, stale_age_ms = acted_on_stale(ticks[ticks["t_recv_ns"] >= t_arm], int(p.stale_periods * s.period_ms * 1e6))
    trips_after_arm = robot_trips(robot, t_arm, t_stop)
    applied = robot["commands_applied"] / max(1, robot["steps"])
    policy = fc["policy_commands"] / max(1, fc["ticks"])
    problems = []
    if reply["node_state"] not in ("ARMED", "RUNNING"):
        problems.append(f"ARM answered {reply['node_state']}")
    if w["lower_ms"] > limit_ms:
        problems.append("RUNNING too late")
    if end["node_state"] != "RUNNING":
        problems.append(f"node {end['node_state']} {after_s} s after re-arming")
    if trips_after_arm:
        problems.append(f"{trips_after_arm} robot watchdog trips after re-arming")
    if applied < min_applied:
        problems.append(f"robot applied commands on {100 * applied:.1f}% of its ticks (< {100 * min_applied:g}%)")
    if policy < min_policy:
        problems.append(f"policy commands on {100 * policy:.1f}% of the ticks after re-arming (< {100 * min_policy:g}%)")
    if stale_acted:
        problems.append(f"the node ran the policy on {stale_acted} state(s) older than stale_periods after ARM, the "
                        f"oldest {stale_age_ms:.0f} ms old")
    problems += health_problems(summary)
    return row("restart qsm-sim, re-arm", not problems,
               f"ARM -> RUNNING {w['lower_ms']:.1f}-{w['upper_ms']:.1f} ms", f"{p.stale_periods} periods = {limit_ms:g} ms",
               f"stale_periods {p.stale_periods} (the first fresh state after ARM makes the node RUNNING)",
               notes(problems,
                     f"ARM answered {reply['node_state']}; new robot: {robot['commands_applied']}/{robot['steps']} ticks "
                     f"with a command, watchdog trips {robot['watchdog_trips']} ({trips_after_arm} after ARM); after ARM "
                     f"{fc['policy_commands']}/{fc['ticks']} ticks with a policy command, {fc['misses']} misses; "
                     f"poll resolution {w['upper_ms'] - w['lower_ms']:.2f} ms; the safe-stop before took "
                     f"{w_stop['lower_ms']:.1f}-{w_stop['upper_ms']:.1f} ms"),
               value_ms=round(w["lower_ms"], 3), upper_ms=round(w["upper_ms"], 3), limit_ms=limit_ms,
               robot_steps=robot["steps"], robot_commands_applied=robot["commands_applied"],
               robot_watchdog_trips=robot["watchdog_trips"], trips_after_arm=trips_after_arm,
               policy_commands_after_arm=fc["policy_commands"], ticks_after_arm=fc["ticks"],
               end_state=end["node_state"], problems=problems)


def fault_restart_serve(model: Path, work_dir: Path, profile_path: Path, run_s: float = 0.5, down_s: float = 0.3,
                        settle_s: float = 1.0, min_policy: float = 0.9) -> dict:
    """After a kill -9 of qsm-serve: a new ``qsm-serve --arm`` on the same endpoints; commands come back.

    If the new node is not RUNNING ``settle_s`` after it answered, the row fails, and one ARM is
    sent to tell whether re-arming recovers it (noted)."""
    s = Session(model, work_dir, profile_path)
    rearm = None
    try:
        serve, sim, _ = start_running(s, run_s=run_s)
        t_kill = kill9(serve)
        time.sleep(down_s)  # the robot is on its safe command by now
        serve2 = s.serve("rec2")
        t_ready = wait_ready_fast(s, serve2)
        time.sleep(settle_s)
        settled = status(s.control)
        if settled["node_state"] != "RUNNING":
            t_arm = time.monotonic_ns()
            status(s.control, P.MsgType.ARM)
            try:
                rearm = watch(s.control, "RUNNING", t_arm, timeout_s=2.0)
            except FaultError as exc:
                rearm = {"error": str(exc)}
            time.sleep(0.5)
        end = status(s.control)
        s.check_alive()
        t_stop = time.monotonic_ns()
        stop(serve2, sim)
        robot = s.robot_report("robot")
        summary, ticks = s.serve_outputs("rec2")
    finally:
        s.close()
    p = s.profile
    limit_ms = 2 * RECONNECT_MS + p.robot.watchdog_periods * s.period_ms
    trips = [t for t in robot["watchdog_trip_t_ns"] if t_kill <= t < t_stop]
    clears = [t for t in robot["watchdog_clear_t_ns"] if t_kill <= t < t_stop]
    last = flight_counts(ticks[ticks["t_recv_ns"] >= t_stop - 500_000_000])  # the last 0.5 s
    policy = last["policy_commands"] / max(1, last["ticks"])
    stale_acted, stale_age_ms = acted_on_stale(ticks, int(p.stale_periods * s.period_ms * 1e6))
    problems = []
    if not trips or trips[0] >= t_ready:
        problems.append("the robot did not go to its safe command while no node was up")
    if not clears:
        problems.append("the robot's watchdog never cleared (no fresh command after the restart)")
    ms = (clears[0] - t_ready) / 1e6 if clears else None
    first_state_ms = (clears[0] - int(ticks["t_recv_ns"][0])) / 1e6 if clears and len(ticks) else None
    if ms is not None and ms > limit_ms:
        problems.append("commands back too late")
    if settled["node_state"] != "RUNNING":
        reasons = "; ".join(summary["safe_stop_reasons"][:2]) or "-"
        how = ("one ARM brought it to RUNNING" if rearm and "upper_ms" in rearm else
               f"one ARM did not help ({(rearm or {}).get('error', '?')})")
        problems.append(f"new node (started with --arm) {settled['node_state']} {settle_s:g} s after it answered "
                        f"(safe-stop reason: {reasons}); {how}")
    if stale_acted:
        problems.append(f"the new node ran the policy on {stale_acted} state(s) older than stale_periods, the oldest "
                        f"{stale_age_ms:.0f} ms old")
    if end["node_state"] != "RUNNING" or policy < min_policy:
        problems.append(f"new node {end['node_state']}, policy commands on {100 * policy:.1f}% of its last 0.5 s of "
                        f"ticks (< {100 * min_policy:g}%)")
    problems += health_problems(summary)
    safe_ms = (trips[0] - t_kill) / 1e6 if trips else float("nan")
    startup = robot_trips(robot, 0, t_kill)
    return row("restart qsm-serve", not problems,
               "no fresh command after the restart" if ms is None else
               f"new node ready -> robot applies fresh commands: {ms:.1f} ms",
               f"{limit_ms:g} ms", f"ZeroMQ reconnect interval {RECONNECT_MS:g} ms + its random jitter (up to as "
               f"much again) + robot.watchdog_periods {p.robot.watchdog_periods} periods",
               notes(problems,
                     f"robot: safe command {safe_ms:.1f} ms after the kill, watchdog cleared "
                     + ("never" if not clears else f"{(clears[0] - t_kill) / 1e6:.0f} ms after the kill "
                        f"({first_state_ms:.1f} ms after the new node's first state)")
                     + f"; new node: policy commands on {100 * policy:.1f}% of its last 0.5 s of ticks, "
                     f"{summary['misses']} misses; robot watchdog trips before the kill (start-up): {startup}, after "
                     f"the restart: {max(0, len(trips) - 1)}"),
               value_ms=None if ms is None else round(ms, 3), limit_ms=limit_ms,
               first_state_to_clear_ms=None if first_state_ms is None else round(first_state_ms, 3),
               robot_watchdog_trips=robot["watchdog_trips"], settled_state=settled["node_state"],
               rearm_to_running_ms=None if not rearm or "upper_ms" not in rearm else round(rearm["upper_ms"], 3),
               end_state=end["node_state"], policy_fraction_last_0_5s=round(policy, 4), stale_states_acted_on=stale_acted,
               oldest_state_acted_on_ms=round(stale_age_ms, 1), problems=problems)


def robot_trips(robot: dict, start_ns: int, end_ns: int) -> int:
    """The robot's watchdog trips between two monotonic times."""
    return sum(start_ns <= t < end_ns for t in robot["watchdog_trip_t_ns"])


def _spikes(s: Session, every: int, spike_ms: float, run_s: float, want: set[str]) -> tuple[dict, dict, dict, np.ndarray, int]:
    """Both nodes with stalls injected; stops qsm-serve first (so its final state is the run's), then
    qsm-sim. Returns (status at the end, summary, robot report, flight ticks, startup-trip cut time)."""
    serve, sim, _ = start_running(s, run_s=run_s, want=want,
                                  serve_extra=("--inject-spike-every", str(every), "--inject-spike-ms", str(spike_ms)))
    end = status(s.control)
    t_stop = time.monotonic_ns()
    stop(serve, sim)
    summary, ticks = s.serve_outputs("rec")
    robot = s.robot_report("robot")
    first = int(ticks["t_recv_ns"][0]) if len(ticks) else t_stop
    trips = robot_trips(robot, first + 100_000_000, t_stop)  # after the first 100 ms (start-up), before the stop
    return end, summary, {**robot, "trips_in_run": trips, "startup_trips": robot_trips(robot, 0, first + 100_000_000)}, ticks, t_stop


def _spike_checks(summary: dict, ticks: np.ndarray, robot: dict, spike_ms: float) -> tuple[dict, list[str]]:
    fc = flight_counts(ticks)
    lat_ms = (ticks["t_send_ns"] - ticks["t_recv_ns"]) / 1e6
    flags = tick_flags(ticks)
    miss, fb, stalled = flags["miss"], flags["fallback"], flags["injected"]
    late = (lat_ms > summary["latency_budget_ms"]) & ~miss
    info = {"injected_stalls": summary["injected_stalls"], "stalled_ticks": int(stalled.sum()),
            "stalled_misses_with_fallback": int((stalled & miss & fb).sum()),
            "stalled_min_ms": round(float(lat_ms[stalled].min()), 3) if stalled.any() else None,
            "misses": summary["misses"], "flight_misses": fc["misses"], "misses_with_fallback": fc["misses_with_fallback"],
            "natural_misses": int((miss & ~stalled).sum()), "sent_past_budget_without_miss": int(late.sum()),
            "internal_errors": summary["internal_errors"], "final_state": summary["final_state"],
            "robot_steps": robot["steps"], "robot_late": robot["commands_late"],
            "robot_trips_in_run": robot["trips_in_run"], "robot_startup_trips": robot["startup_trips"]}
    problems = []
    if summary["injected_stalls"] == 0:
        problems.append("no stall was injected")
    if info["stalled_ticks"] != summary["injected_stalls"]:
        problems.append(f"{info['stalled_ticks']} stalled ticks found in the flight record, the runner injected "
                        f"{summary['injected_stalls']}")
    if info["stalled_misses_with_fallback"] != info["stalled_ticks"]:
        problems.append(f"{info['stalled_ticks'] - info['stalled_misses_with_fallback']} stalls not answered by a "
                        "fallback-flagged miss")
    if stalled.any() and info["stalled_min_ms"] < spike_ms:
        problems.append(f"a tick taken for a stall took {info['stalled_min_ms']} ms < {spike_ms:g} ms")
    if fc["misses"] != summary["misses"]:
        problems.append(f"flight record holds {fc['misses']} misses, summary says {summary['misses']}")
    return info, problems + fallback_problems(fc) + health_problems(summary)


def fault_spikes(model: Path, work_dir: Path, profile_path: Path, every: int = 50, spike_ms: float | None = None,
                 run_s: float = 3.0) -> dict:
    """A stall of spike_ms (default 3x the budget) on every ``every``-th policy call."""
    s = Session(model, work_dir, profile_path)
    spike_ms = spike_ms or 3 * s.profile.latency_budget_ms
    try:
        end, summary, robot, ticks, _ = _spikes(s, every, spike_ms, run_s, want={"RUNNING"})
    finally:
        s.close()
    info, problems = _spike_checks({**summary, "latency_budget_ms": s.profile.latency_budget_ms}, ticks, robot,
                                   spike_ms)
    if end["node_state"] != "RUNNING" or summary["final_state"] != "RUNNING":
        problems.append(f"node {end['node_state']} / {summary['final_state']} at the end (expected RUNNING: the "
                        "stalls are not consecutive)")
    # Robot watchdog trips are reported in the notes, not judged: a stall delays the answers to the
    # states around it, and the robot's watchdog is the layer that covers a quiet node.
    return row(f"spikes {spike_ms:g} ms every {every}th call", not problems,
               f"{info['injected_stalls']} stalls -> {info['stalled_misses_with_fallback']} fallback-answered misses",
               f"every stall a miss answered by a fallback (budget {s.profile.latency_budget_ms:g} ms)",
               "latency_budget_ms (stall = 3x budget)",
               notes(problems,
                     f"misses {summary['misses']} in all ({info['natural_misses']} not injected), "
                     f"{info['misses_with_fallback']} with a fallback; {info['sent_past_budget_without_miss']} other "
                     f"commands sent past the budget; internal errors {summary['internal_errors']}, final state "
                     f"{summary['final_state']}; robot {robot['steps']} steps, {robot['commands_late']} late, watchdog "
                     f"trips {robot['trips_in_run']} (start-up: {robot['startup_trips']})"),
               spike_ms=spike_ms, every=every, problems=problems, **info)


def fault_spikes_consecutive(model: Path, work_dir: Path, profile_path: Path, spike_ms: float | None = None,
                             after_s: float = 0.5) -> dict:
    """A stall on every policy call: max_consecutive_misses misses, then SAFE_STOP, no crash."""
    s = Session(model, work_dir, profile_path)
    limit = s.profile.max_consecutive_misses
    spike_ms = spike_ms or 3 * s.profile.latency_budget_ms
    try:
        _, summary, robot, ticks, _ = _spikes(s, 1, spike_ms, after_s, want={"SAFE_STOP", "FAULT"})
    finally:
        s.close()
    info, problems = _spike_checks({**summary, "latency_budget_ms": s.profile.latency_budget_ms}, ticks, robot,
                                   spike_ms)
    reason = f"{limit} consecutive deadline misses or bad actions"
    if summary["safe_stop_reasons"] != [reason]:
        problems.append(f"safe-stop reasons {summary['safe_stop_reasons']}, expected [{reason!r}]")
    if summary["final_state"] != "SAFE_STOP":
        problems.append(f"final state {summary['final_state']}")
    # Every miss is a stall, except when the VM descheduled the node so long that a state's budget was
    # spent before the policy call (a miss without a call): those count toward the limit too.
    if summary["misses"] != limit:
        problems.append(f"misses {summary['misses']}, expected {limit}")
    if not 0 < info["injected_stalls"] <= limit or info["injected_stalls"] + info["natural_misses"] != summary["misses"]:
        problems.append(f"stalls {info['injected_stalls']} + misses without a stall {info['natural_misses']} != "
                        f"misses {summary['misses']}")
    return row("spikes on every call", not problems,
               f"SAFE_STOP after {summary['misses']} consecutive misses ({summary['injected_stalls']} stalls)",
               f"{limit} misses", "max_consecutive_misses",
               notes(problems,
                     f"safe-stop reasons {summary['safe_stop_reasons']}; {info['misses_with_fallback']}/"
                     f"{info['flight_misses']} misses with a fallback; internal errors {summary['internal_errors']}; "
                     f"robot {robot['steps']} steps, watchdog trips {robot['trips_in_run']} (start-up: "
                     f"{robot['startup_trips']})"),
               spike_ms=spike_ms, limit_misses=limit, problems=problems, **info)


# --- the campaign ---------------------------------------------------------------------------------
def aggregate(rows: list[dict], key: str, label: str, period_ms: float) -> dict:
    """One row for the trials of one fault: max and median of ``key`` (ms); passes if every trial did."""
    if len(rows) == 1:
        return rows[0]
    vals = [r[key] for r in rows if r.get(key) is not None]
    fails = [r for r in rows if not r["pass"]]
    base = dict(fails[0] if fails else rows[-1])
    measured = [r for r in rows if r.get(key) is not None]
    if measured:  # the limit as the profile gives it, even when the first failure measured nothing
        base.update(limit=measured[0]["limit"], limit_from=measured[0]["limit_from"])
    text = "no value" if not vals else (f"{label}: max {max(vals):.2f} ms ({max(vals) / period_ms:.2f} periods), median "
                                        f"{statistics.median(vals):.2f} ms ({statistics.median(vals) / period_ms:.2f} periods)")
    uppers = [r["upper_ms"] for r in rows if r.get("upper_ms") is not None]
    if uppers:
        text += f"; latest bound max {max(uppers):.2f} ms"
    count = f"{len(rows)} trials" + (f" ({len(vals)} measured)" if len(vals) != len(rows) else "")
    return {**base, "measured": f"{text} over {count}", "result": "FAIL" if fails else "PASS",
            "pass": not fails, "trials": len(rows), "trial_values_ms": ";".join(str(v) for v in vals),
            "notes": (f"{len(fails)}/{len(rows)} trials failed; first: {fails[0]['measured']} | {fails[0]['notes']}"
                      if fails else f"last trial: {base['notes']}")}


def failed_row(fault: str, exc: Exception) -> dict:
    return row(fault, False, "not measured", "-", "-", f"{type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX policy (task of the profile)")
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="deployment profile (endpoints are replaced)")
    p.add_argument("--trials", type=int, default=3, help="repeats of each kill -9 measurement")
    args = p.parse_args(argv)
    profile = load_inputs("faults.py", args.model, args.profile)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = RESULTS / f"faults-{stamp}"
    print(f"faults: {args.model} on {profile.name} ({profile.rate_hz:g} Hz, budget {profile.latency_budget_ms} ms), "
          f"{args.trials} trial(s) per kill; work files in {work}", file=sys.stderr)
    plan = [
        ("kill -9 qsm-serve", fault_kill_serve, args.trials, "kill -> robot safe command"),
        ("kill -9 qsm-sim", fault_kill_robot, args.trials, "kill -> node SAFE_STOP (earliest bound)"),
        ("restart qsm-sim, re-arm", fault_restart_robot, 1, None),
        ("restart qsm-serve", fault_restart_serve, 1, None),
        ("spikes", fault_spikes, 1, None),
        ("spikes on every call", fault_spikes_consecutive, 1, None),
    ]
    rows = []
    for name, fn, n, label in plan:
        trials = []
        for i in range(n):
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            try:
                r = fn(args.model, work / f"{slug}-{i + 1}", args.profile)
            except (FaultError, OSError, ValueError, subprocess.SubprocessError) as exc:
                r = failed_row(name, exc)
            trials.append(r)
            print(f"  {name} [{i + 1}/{n}]: {r['result']}: {r['measured']}", file=sys.stderr)
        rows.append(aggregate(trials, "value_ms", label, 1e3 / profile.rate_hz) if label else trials[0])
    print()
    print_table(rows, COLUMNS)
    out = RESULTS / f"faults_{stamp}.csv"
    write_csv(out, [{k: v for k, v in r.items() if k != "problems"} for r in rows])
    failed = [r["fault"] for r in rows if not r["pass"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} faults passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
