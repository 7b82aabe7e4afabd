"""The node's logic without sockets or timing: frame admission, the state machine, the policy call,
the safety chain and the telemetry record.

Like a ros2_control controller, the core only ``update``s: the loop in ``serve/node.py`` reads
frames and the clock from its sockets, calls the core, and writes the bytes the core returns.

    loop (node.py)                         core (this file)
    frame = state_sock.recv()      ->      core.hold(core.admit(frame, t_recv))
    (at core.due_at())             ->      admitted = core.take_due(now)
                                           answer = core.act(admitted)
    command_sock.send(answer.frame)
    t_send = clock()               ->      core.record(answer, t_send)
    frame = control_sock.recv()    ->      reply = core.control(frame)      (send reply, if any)
    once a period                  ->      core.periodic(now)

So the whole behaviour of the node (which state is answered how, when it safe-stops, what STATUS
says) is tested here without ZeroMQ (tests/test_serve_core.py). It imports numpy and the serving
modules only.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qsm_robot.serve import protocol as P
from qsm_robot.serve import realtime
from qsm_robot.serve.profile import Profile, check_contract
from qsm_robot.serve.safety import SafetyChain, SafetyConfig
from qsm_robot.serve.state_machine import Event, next_state
from qsm_robot.serve.status import Status
from qsm_robot.serve.telemetry import FlightRecorder, percentiles

POLL_SLACK_NS = 1_000_000
"""How late periodic work may run: the loop waits in poll(), which counts whole milliseconds."""


@dataclass
class Counters:
    ticks: int = 0
    misses: int = 0
    stale: int = 0
    malformed: int = 0
    replayed: int = 0
    clock_jumps: int = 0
    over_budget: int = 0
    resyncs: int = 0
    safe_stops: int = 0
    errors: int = 0
    wrong_version: int = 0
    restarts: int = 0
    seq_gaps: int = 0
    superseded: int = 0
    reasons: deque = field(default_factory=lambda: deque(maxlen=20))
    """The reasons of the last 20 safe-stops (fixed memory however long the node runs)."""


@dataclass
class Admitted:
    """A state frame that passed admission: worth answering when it is due."""

    msg: P.Message
    age_ns: int
    """Its age on receipt (transit time, or transit minus the smallest transit on two clocks)."""
    t_recv: int
    """Monotonic receive time, ns."""


@dataclass
class Answer:
    """The command a state gets, and what the flight record needs once it is sent."""

    frame: bytes
    """The encoded COMMAND message: the loop sends exactly this."""
    admitted: Admitted
    command: np.ndarray
    flags: int
    """Tick flags (``protocol.TickFlag``)."""
    policy_us: float
    """The policy's own run time, NaN when the policy did not answer."""


class FloodGuard:
    """How often the policy may be evaluated: a token bucket of ``burst`` evaluations, refilled at
    ``per_period`` evaluations per period (integer credit in nanoseconds).

    A steady robot never waits (one state a period leaves the bucket full); a late state and the
    on-time state right after it are both answered at once; a flood of states drives the policy at
    most ``per_period`` times a period on average.
    """

    def __init__(self, period_ns: int, burst: int = 2, per_period: int = 2):
        self.cost = period_ns // per_period
        self.capacity = burst * self.cost
        self.credit = self.capacity
        self.t: int | None = None

    def _refill(self, now: int) -> None:
        if self.t is not None:
            self.credit = min(self.capacity, self.credit + max(0, now - self.t))
        self.t = now

    def ready_at(self, now: int) -> int:
        """The earliest time an evaluation may run (``now`` when one may run at once)."""
        self._refill(now)
        return now + max(0, self.cost - self.credit)

    def take(self, now: int) -> bool:
        """Spend one evaluation if the bucket holds one."""
        self._refill(now)
        if self.credit < self.cost:
            return False
        self.credit -= self.cost
        return True


class NodeCore:
    """Everything the node decides, given frames and times; see the module docstring."""

    def __init__(self, profile: Profile, runner, calibration_id: str | None = None,
                 log: Callable[[str], None] | None = None, auth_denied: Callable[[], int] = lambda: 0):
        """runner: a ``PolicyRunner`` (or a wrapper of one, ``serve/fault_injection.py``);
        auth_denied: how many connections CURVE refused so far (the loop owns the sockets)."""
        self.profile, self.runner, self.calibration_id = profile, runner, calibration_id
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.auth_denied = auth_denied
        check_contract(profile, runner.contract)
        self.safety = SafetyChain(SafetyConfig.from_profile(profile))
        self.state = P.NodeState.IDLE
        self.counters = Counters()
        self.recorder = FlightRecorder(profile.obs_dim, profile.act_dim, capacity=profile.flight_record_ticks)
        self.period_ns = int(round(1e9 / profile.rate_hz))
        self.budget_ns = int(profile.latency_budget_ms * 1e6)
        self.stale_ns = profile.stale_periods * self.period_ns
        self.no_state_limit_ns = (profile.stale_periods + profile.max_consecutive_stale) * self.period_ns
        self.realtime: realtime.RealtimeReport | None = None
        """What the profile's real-time settings came to (the loop applies them); None before."""
        self._cmd_seq = self._status_seq = 0  # one sequence per channel
        self._latency_cache: tuple[int, dict] = (-(10**18), {})
        self.last_state_seq: int | None = None
        self._last_good_ns: int | None = None
        self._offset_ns: int | None = None
        self._consecutive_misses = self._consecutive_stale = 0
        self._window: deque[bool] = deque(maxlen=2 * profile.resync_threshold)
        """For the last 2 x resync_after_rejected state frames read: whether each was rejected for its
        seq or clock *and* continued the previous rejected frame's seq by one, i.e. a live stream is
        being locked out (a robot restarted without its flag, or one whose reference a forged
        seq moved ahead). Replays and reordered frames, whose seqs do not run on, never count."""
        self._locked_out = 0  # how many True entries _window holds (kept as frames come and go)
        self._last_rejected_seq: int | None = None
        self._restarting = False  # the last state taken carried the restart flag
        self.pending: Admitted | None = None
        """The newest admitted state, until it is due (``take_due``)."""
        self.flood_guard = FloodGuard(self.period_ns)

    # --- state machine ---------------------------------------------------------------------
    def event(self, event: Event, reason: str) -> bool:
        """Apply ``event`` through the transition table; False when the table ignores it here."""
        state = next_state(self.state, event)
        if state is None:
            return False
        self._enter(state, reason)
        return True

    def _enter(self, state: P.NodeState, reason: str) -> None:
        """Only through event() (the table); logs and counts a change, resets the miss/stale runs."""
        if state != self.state:
            self.log(f"qsm-serve: {self.state.name} -> {state.name}: {reason}")
            if state == P.NodeState.SAFE_STOP:
                self.counters.safe_stops += 1
                self.counters.reasons.append(reason)
            self.state = state
        if state in (P.NodeState.SAFE_STOP, P.NodeState.IDLE):
            self._consecutive_misses = self._consecutive_stale = 0

    def arm(self, reason: str) -> bool:
        """IDLE or SAFE_STOP -> ARMED (the soft-start ramp begins); ignored when ARMED or RUNNING;
        refused (False) in FAULT."""
        if next_state(self.state, Event.ARM) is None:
            if self.state == P.NodeState.FAULT:
                self.log("qsm-serve: ARM refused: the node is in FAULT; restart it")
                return False
            return True
        self.safety.arm()
        self._last_good_ns = None
        self.event(Event.ARM, reason)
        return True

    def error(self, exc: BaseException) -> None:
        """An unexpected error inside a loop turn: count it and go to FAULT (answers stay safe)."""
        self.counters.errors += 1
        self.event(Event.ERROR, f"internal error: {type(exc).__name__}: {exc}")

    # --- control channel --------------------------------------------------------------------
    def control(self, frame: bytes) -> bytes | None:
        """One control message (ARM, DISARM, ESTOP, HEARTBEAT): acted on, answered with STATUS.
        None for a malformed one (counted), which gets no reply."""
        try:
            msg = P.decode(frame)
        except P.VersionError:
            self.counters.wrong_version += 1
            return None
        except P.ProtocolError:
            self.counters.malformed += 1
            return None
        if len(msg.payload):  # control messages carry none
            self.counters.malformed += 1
            return None
        if msg.type == P.MsgType.ARM:
            self.arm("arm requested")
        elif msg.type == P.MsgType.DISARM:
            self.event(Event.DISARM, "disarm requested")
        elif msg.type == P.MsgType.ESTOP:
            self.event(Event.ESTOP, "e-stop")
        elif msg.type != P.MsgType.HEARTBEAT:
            self.counters.malformed += 1
            return None
        self._status_seq += 1
        return P.encode(P.MsgType.STATUS, self._status_seq, self.status().encode(), ref=msg.seq)

    def status(self) -> Status:
        """What a STATUS reply carries."""
        c, s, cfg = self.counters, self.safety.counts, self.safety.cfg
        now = time.monotonic_ns()
        if now - self._latency_cache[0] > 100_000_000:  # percentiles at most every 100 ms: requests are cheap
            self._latency_cache = (now, self.latency_us())
        lat = self._latency_cache[1]
        vec = lambda v: None if v is None else tuple(float(x) for x in v)  # noqa: E731
        rt = self.realtime
        return Status(node_state=self.state, ticks=c.ticks, misses=c.misses, stale=c.stale, fallbacks=s["fallbacks"],
                      bounds_clamped=s["bounds_clamped"], rate_clamped=s["rate_clamped"],
                      state_invalid=s["state_invalid"], action_invalid=s["action_invalid"],
                      obs_out_of_range=s["obs_out_of_range"], malformed=c.malformed, p50_us=lat["p50"],
                      p99_us=lat["p99"], max_us=lat["max"], replayed=c.replayed, clock_jumps=c.clock_jumps,
                      resyncs=c.resyncs, over_budget=c.over_budget, auth_denied=self.auth_denied(),
                      calibration_id=self.calibration_id, latency_budget_ms=self.profile.latency_budget_ms,
                      act_dim=cfg.act_dim, obs_dim=cfg.obs_dim,
                      rt_cpu_affinity=rt.cpu_affinity.code if rt else 0, rt_cpu_mask=rt.cpu_mask if rt else 0,
                      rt_sched_fifo_priority=(-1 if rt.sched_fifo.state == realtime.REFUSED else rt.fifo_priority)
                      if rt else 0, rt_mlockall=rt.mlockall.code if rt else 0, spin_us=float(self.profile.spin_us),
                      wrong_version=c.wrong_version, restarts=c.restarts, seq_gaps=c.seq_gaps, superseded=c.superseded,
                      max_delta_per_tick=vec(cfg.max_delta),
                      obs_low=vec(cfg.obs_low), obs_high=vec(cfg.obs_high))

    def answered_rate_hz(self) -> float:
        """States answered per second, from the first to the last answered state."""
        r = self.recorder
        span = (r.last_recv_ns - r.first_recv_ns) / 1e9
        return (r.total - 1) / span if r.total > 1 and span > 0 else 0.0

    def latency_us(self, last: int | None = 5000) -> dict[str, float]:
        """State received -> command sent over the last ``last`` ticks (None: the whole run)."""
        if last is None:
            return self.recorder.latency.percentiles()
        d = self.recorder.tail(last)
        return percentiles((d["t_send_ns"] - d["t_recv_ns"]) / 1e3)

    # --- one answered state -----------------------------------------------------------------
    def admit(self, frame: bytes, t_recv: int) -> Admitted | None:
        """Checks on receipt: an :class:`Admitted` state worth answering, else None (counted).
        A rejected frame never takes the place of a pending good state."""
        try:
            msg = P.decode(frame)
        except P.VersionError as exc:
            if not self.counters.wrong_version:
                self.log(f"qsm-serve: a peer sent a frame of {exc} (counted in wrong_version, dropped)")
            self.counters.wrong_version += 1
            return None
        except P.ProtocolError:
            self.counters.malformed += 1
            return None
        if msg.type != P.MsgType.STATE:
            self.counters.malformed += 1
            return None
        flagged = bool(msg.flags & P.StateFlag.RESTART)
        # A new stream: a state with the restart flag after one without it (or the first state the
        # node reads), or a flagged state that does not follow the flagged stream (the robot
        # restarted again). The robot sets the flag until one of its states is answered, so a
        # restart survives the loss of its first states (ZeroMQ drops what is published before
        # the connection is up); the states before the first one read are counted as seq gaps.
        restart = flagged and (not self._restarting or self.last_state_seq is None or msg.seq <= self.last_state_seq)
        # Re-sync: once resync_after_rejected of the last 2 x resync_after_rejected state frames
        # were rejected for their seq or their clock, the stream itself has changed (a robot
        # restarted without its flag, a forged seq or clock, another stream interleaved with the
        # robot's): take this state as the new reference, and safe-stop, so that acting on the new
        # stream needs an operator's ARM.
        rejected = self._locked_out  # rejected frames of a live stream among the last 2N read
        resync = not restart and rejected >= self.profile.resync_threshold
        if resync:
            self.counters.resyncs += 1
            self._window.clear()
            self._locked_out = 0
            self.event(Event.RESYNC, f"re-synchronised to the state stream after {rejected} rejected states: "
                                     "ARM to continue")
        if self.last_state_seq is not None and msg.seq <= self.last_state_seq and not (resync or restart):
            self.counters.replayed += 1  # old, replayed or out-of-order: never act on it
            self._reject(msg.seq)
            return None
        transit = t_recv - msg.t_ns
        if self.profile.same_clock:
            # One clock (one host, or clocks synchronised by PTP): the age is the transit time.
            # A state "from the future" by more than the staleness limit is a clock jump or a
            # forged time: never acted on.
            if transit < -self.stale_ns:
                self.counters.clock_jumps += 1
                self._reject(msg.seq)
                self._take_seq(msg.seq, restart, resync, flagged)  # counted once: as a clock jump, not a gap
                return None
            self._offset_ns = 0
        else:
            # Two unsynchronised clocks: the offset is the smallest transit since the robot's start.
            new_reference = self._offset_ns is None or resync or restart
            self._offset_ns = transit if new_reference else min(self._offset_ns, transit)
        self._take_seq(msg.seq, restart, resync, flagged)
        self._note(False)
        return Admitted(msg, transit - self._offset_ns, t_recv)

    def _reject(self, seq: int) -> None:
        """A frame rejected for its seq or clock: it counts toward a re-sync if it runs on from the
        last rejected one (seq + 1), as a locked-out stream does."""
        self._note(self._last_rejected_seq is not None and seq == self._last_rejected_seq + 1)
        self._last_rejected_seq = seq

    def _note(self, locked_out: bool) -> None:
        """One state frame into the re-sync window, keeping its count of locked-out frames."""
        if len(self._window) == self._window.maxlen and self._window[0]:
            self._locked_out -= 1
        self._window.append(locked_out)
        self._locked_out += locked_out

    def _take_seq(self, seq: int, restart: bool, resync: bool, flagged: bool) -> None:
        """``seq`` becomes the last one taken; the seqs skipped to reach it are counted as gaps."""
        if restart:
            self.counters.restarts += 1
            self.counters.seq_gaps += max(0, seq - 1)  # the new stream's states before this one
        elif self.last_state_seq is not None and not resync:
            self.counters.seq_gaps += seq - self.last_state_seq - 1
        self.last_state_seq = seq
        self._restarting = flagged

    def hold(self, admitted: Admitted | None) -> None:
        """Keep an admitted state until it is due; one still pending is superseded (counted)."""
        if admitted is None:
            return
        if self.pending is not None:
            self.counters.superseded += 1
        self.pending = admitted

    def due_at(self, now: int) -> int | None:
        """When the pending state may be evaluated (None: nothing pending)."""
        return None if self.pending is None else self.flood_guard.ready_at(now)

    def take_due(self, now: int) -> Admitted | None:
        """The pending state, if the flood guard lets it be evaluated now."""
        if self.pending is None or not self.flood_guard.take(now):
            return None
        admitted, self.pending = self.pending, None
        return admitted

    def act(self, admitted: Admitted) -> Answer:
        """Decide the one command an admitted state gets (the policy's while RUNNING and usable,
        else a fallback or the safe command), through the safety chain."""
        msg, t_recv = admitted.msg, admitted.t_recv
        self.counters.ticks += 1
        obs = msg.payload
        usable, flags = self.safety.check_state(obs)
        if admitted.age_ns > self.stale_ns:
            self.counters.stale += 1
            flags |= P.TickFlag.STALE
            usable = False
        if usable:
            self._last_good_ns = t_recv
        policy_us = float("nan")
        if usable:
            self.event(Event.GOOD_STATE, "first good state after arming")
        if self.state == P.NodeState.RUNNING:
            if not usable:
                result = self.safety.fallback_command(flags)
                self._consecutive_stale += 1
            else:
                self._consecutive_stale = 0
                action = self.runner.run(obs, (self.budget_ns - (time.monotonic_ns() - t_recv)) / 1e9)
                if action is not None and time.monotonic_ns() - t_recv > self.budget_ns:
                    action = None  # finished, but past the budget: too late to use
                if getattr(self.runner, "stalled", False):  # fault injection (SpikyRunner)
                    flags |= P.TickFlag.INJECTED_STALL
                if action is None:
                    self.counters.misses += 1
                    self._consecutive_misses += 1
                    result = self.safety.fallback_command(flags | P.TickFlag.MISS)
                else:
                    policy_us = self.runner.last_run_us
                    result = self.safety.filter_action(action, flags)
                    self._consecutive_misses = self._consecutive_misses + 1 if result.fallback else 0
            command, flags = result.command, result.flags
            cmd_flags = int(P.CommandFlag.FALLBACK) if result.fallback else 0
            if self._consecutive_misses >= self.profile.max_consecutive_misses:
                self.event(Event.MISSES, f"{self._consecutive_misses} consecutive deadline misses or bad actions")
            elif self._consecutive_stale >= self.profile.max_consecutive_stale:
                self.event(Event.STALE, f"{self._consecutive_stale} consecutive stale or invalid states")
        else:
            command = self.safety.safe_command()
            cmd_flags = int(P.CommandFlag.SAFE)
        self._cmd_seq += 1
        frame = P.encode(P.MsgType.COMMAND, self._cmd_seq, command, ref=msg.seq, flags=cmd_flags)
        return Answer(frame, admitted, command, int(flags), policy_us)

    def record(self, answer: Answer, t_send: int) -> None:
        """After the loop sent ``answer.frame`` at ``t_send``: the flight record and the budget check."""
        a = answer.admitted
        if answer.policy_us == answer.policy_us and t_send - a.t_recv > self.budget_ns:
            self.counters.over_budget += 1  # a policy command sent after the budget (the process was descheduled)
        obs = a.msg.payload
        self.recorder.add(a.t_recv, t_send, a.msg.seq, a.msg.t_ns, answer.policy_us, int(self.state), answer.flags,
                          answer.command, obs if obs.shape == (self.profile.obs_dim,) else None)

    def answer(self, frame: bytes, t_recv: int) -> bytes | None:
        """Admit, act and record at once (no flood guard, sent "now"): the command frame, or None
        for a rejected state. For tests and tools that drive the core frame by frame."""
        admitted = self.admit(frame, t_recv)
        if admitted is None:
            return None
        answer = self.act(admitted)
        self.record(answer, time.monotonic_ns())
        return answer.frame

    # --- periodic work ----------------------------------------------------------------------
    def periodic(self, now: int) -> None:
        """Once a period: without a usable state for stale_periods, count a stale tick; safe-stop
        at the last check inside (stale_periods + max_consecutive_stale) periods of the last one."""
        if self.state == P.NodeState.RUNNING and self._last_good_ns is not None and now - self._last_good_ns > self.stale_ns:
            self.counters.stale += 1
            self._consecutive_stale += 1
            # The next check comes a period later, plus up to POLL_SLACK_NS (poll() rounds up).
            if now - self._last_good_ns + self.period_ns + POLL_SLACK_NS >= self.no_state_limit_ns:
                self.event(Event.STALE, f"no fresh state for {(now - self._last_good_ns) / 1e6:.1f} ms")

    def handover_frame(self) -> bytes:
        """The last command of a stopping node: the safe one (then the robot's watchdog is in charge)."""
        self._cmd_seq += 1
        return P.encode(P.MsgType.COMMAND, self._cmd_seq, self.safety.safe_command(),
                        ref=self.last_state_seq or 0, flags=int(P.CommandFlag.SAFE))
