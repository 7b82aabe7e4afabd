"""The serving node: answers every robot state with a command inside the latency budget.

Timing: each STATE is answered as soon as it arrives (the policy runs on a worker thread and the
tick gives up on it at the budget, sending the fallback command). Periodic work (staleness,
status) runs on an absolute schedule of the monotonic clock: deadline k is t0 + k * period,
never "one period after the work". At most one state is evaluated per half period, so a flood
of states cannot drive the policy faster than twice the nominal rate.

States (serve/state_machine.py holds the whole table): IDLE -> (ARM) -> ARMED -> (first good
state) -> RUNNING; ESTOP, too many consecutive misses, stale ticks or rejected states (re-sync)
-> SAFE_STOP (ARM to leave); DISARM -> IDLE. An unexpected error inside a tick -> FAULT (the node
keeps answering with the safe command; restart to leave). Every state is answered: with the
policy's command while RUNNING, with the safe command otherwise.
"""

from __future__ import annotations

import gc
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from qsm_robot.serve import protocol as P
from qsm_robot.serve import realtime
from qsm_robot.serve.auth import CurveServer
from qsm_robot.serve.policy_runner import PolicyRunner
from qsm_robot.serve.profile import Profile, check_contract
from qsm_robot.serve.safety import SafetyChain, SafetyConfig
from qsm_robot.serve.state_machine import Event, next_state
from qsm_robot.serve.status import Status
from qsm_robot.serve.telemetry import FlightRecorder, percentiles

POLL_SLACK_NS = 1_000_000
"""How late periodic work may run: the loop waits in poll(), which counts whole milliseconds."""


def is_loopback(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0]
    return endpoint.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "[::1]", "::1")


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
    reasons: deque = field(default_factory=lambda: deque(maxlen=20))
    """The reasons of the last 20 safe-stops (fixed memory however long the node runs)."""


class ServeNode:
    def __init__(self, model: str | Path, profile: Profile, seed: int = 0, log=None, allow_remote: bool = False,
                 calibration_id: str | None = None, runner: PolicyRunner | None = None):
        """profile: with a calibration record's values already applied (``CalibrationRecord.apply``);
        calibration_id: that record's short id, reported in the status; runner: the policy runner
        (default ``PolicyRunner(model, seed)``; fault injection passes a wrapped one,
        ``serve/fault_injection.py``)."""
        self.profile, self.log = profile, log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.calibration_id = calibration_id
        remote = [f"{name}={endpoint}" for name, endpoint in vars(profile.endpoints).items() if not is_loopback(endpoint)]
        if remote and profile.curve is None:
            if not allow_remote:
                raise ValueError(f"endpoints {', '.join(remote)} are not loopback and the profile has no CURVE keys: "
                                 "configure 'curve' (qsm-serve keygen) or pass --allow-remote to expose the node "
                                 "unauthenticated")
            self.log(f"qsm-serve: WARNING: {', '.join(remote)} bound beyond this host WITHOUT authentication: anyone "
                     "who can reach it can send states and arm, disarm or e-stop the node. Configure 'curve'.")
        self.runner = runner if runner is not None else PolicyRunner(model, seed=seed)
        check_contract(profile, self.runner.contract)
        self.safety = SafetyChain(SafetyConfig.from_profile(profile))
        self.state = P.NodeState.IDLE
        self.counters = Counters()
        self.recorder = FlightRecorder(profile.obs_dim, profile.act_dim, capacity=profile.flight_record_ticks)
        self.period_ns = int(round(1e9 / profile.rate_hz))
        self.budget_ns = int(profile.latency_budget_ms * 1e6)
        self.stale_ns = profile.stale_periods * self.period_ns
        self.no_state_limit_ns = (profile.stale_periods + profile.max_consecutive_stale) * self.period_ns
        self._stop = False
        self._cmd_seq = self._status_seq = 0  # one sequence per channel
        self._latency_cache: tuple[int, dict] = (-(10**18), {})
        self._last_state_seq: int | None = None
        self._last_good_ns: int | None = None
        self._offset_ns: int | None = None
        self._consecutive_misses = self._consecutive_stale = self._consecutive_rejected = 0
        self._last_eval_ns = -(10**18)
        self._pending: tuple[bytes, int] | None = None
        self.spin_ns = int(profile.spin_us * 1e3)
        self._expected_ns: int | None = None  # when the next state should arrive
        self._rate_hz = 0.0
        self._rate_mark: tuple[int, int] | None = None  # (time, ticks) at the last status interval
        self.realtime: realtime.RealtimeReport | None = None
        """What the profile's real-time settings came to (``apply_realtime``); None before."""

        self.ctx = zmq.Context.instance()
        self.curve = CurveServer(self.ctx, profile.curve) if profile.curve is not None else None
        self.state_sock = self._socket(zmq.SUB, profile.endpoints.state, conflate=True)
        self.state_sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.command_sock = self._socket(zmq.PUB, profile.endpoints.command, conflate=False)
        self.control_sock = self._socket(zmq.ROUTER, profile.endpoints.control, conflate=False)

    def _socket(self, kind: int, endpoint: str, conflate: bool) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.secure(sock)
        if conflate:
            sock.setsockopt(zmq.CONFLATE, 1)  # keep only the newest message: never act on a queue of old states
        else:
            sock.setsockopt(zmq.SNDHWM, 100)
            sock.setsockopt(zmq.RCVHWM, 100)
        if kind in (zmq.ROUTER, zmq.SUB):  # no valid message is larger: ZeroMQ drops the frame and its sender's connection
            sock.setsockopt(zmq.MAXMSGSIZE, 4096 if kind == zmq.ROUTER else P.HEADER_SIZE + 4 * P.MAX_COUNT)
        sock.bind(endpoint)
        return sock

    def apply_realtime(self) -> realtime.RealtimeReport:
        """Apply the profile's ``realtime`` settings to the calling thread, which must be the one
        that runs the loop (``run`` does it when nobody did); each refused setting is logged as one
        warning and the node runs on without it. Never raises."""
        self.realtime = realtime.apply(self.profile.realtime, self.profile.spin_us)
        for line in self.realtime.warnings():
            self.log(f"qsm-serve: {line}")
        return self.realtime

    # --- state machine ---------------------------------------------------------------------
    def _event(self, event: Event, reason: str) -> bool:
        """Apply ``event`` through the transition table; False when the table ignores it here."""
        state = next_state(self.state, event)
        if state is None:
            return False
        self._enter(state, reason)
        return True

    def _enter(self, state: P.NodeState, reason: str) -> None:
        """Only through _event (the table); logs and counts a change, resets the miss/stale runs."""
        if state != self.state:
            self.log(f"qsm-serve: {self.state.name} -> {state.name}: {reason}")
            if state == P.NodeState.SAFE_STOP:
                self.counters.safe_stops += 1
                self.counters.reasons.append(reason)
            self.state = state
        if state in (P.NodeState.SAFE_STOP, P.NodeState.IDLE):
            self._consecutive_misses = self._consecutive_stale = 0

    def _handle_control(self, most: int = 8) -> None:
        """At most ``most`` control messages per loop turn: a flood of them cannot starve the loop."""
        for _ in range(most):
            try:
                parts = self.control_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 2:
                self.counters.malformed += 1
                continue
            identity, frame = parts
            try:
                msg = P.decode(frame)
            except P.ProtocolError:
                self.counters.malformed += 1
                continue
            if len(msg.payload):  # control messages carry none
                self.counters.malformed += 1
                continue
            if msg.type == P.MsgType.ARM:
                self.arm("arm requested")
            elif msg.type == P.MsgType.DISARM:
                self._event(Event.DISARM, "disarm requested")
            elif msg.type == P.MsgType.ESTOP:
                self._event(Event.ESTOP, "e-stop")
            elif msg.type != P.MsgType.HEARTBEAT:
                self.counters.malformed += 1
                continue
            try:
                reply = P.encode(P.MsgType.STATUS, self._status_seq + 1, self.status().encode(), ref=msg.seq)
                self.control_sock.send_multipart([identity, reply], zmq.NOBLOCK)
                self._status_seq += 1
            except zmq.Again:
                pass

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
        self._event(Event.ARM, reason)
        return True

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
                      resyncs=c.resyncs, over_budget=c.over_budget, auth_denied=self.curve.denied if self.curve else 0,
                      calibration_id=self.calibration_id, latency_budget_ms=self.profile.latency_budget_ms,
                      act_dim=cfg.act_dim, obs_dim=cfg.obs_dim,
                      rt_cpu_affinity=rt.cpu_affinity.code if rt else 0, rt_cpu_mask=rt.cpu_mask if rt else 0,
                      rt_sched_fifo_priority=(-1 if rt.sched_fifo.state == realtime.REFUSED else rt.fifo_priority)
                      if rt else 0, rt_mlockall=rt.mlockall.code if rt else 0, spin_us=float(self.profile.spin_us),
                      max_delta_per_tick=vec(cfg.max_delta),
                      obs_low=vec(cfg.obs_low), obs_high=vec(cfg.obs_high))

    @property
    def rate_hz(self) -> float:
        """States answered per second over the last status interval of ``run`` (0 before the first)."""
        return self._rate_hz

    def _mark_rate(self, now: int) -> None:
        if self._rate_mark is not None and now > self._rate_mark[0]:
            self._rate_hz = (self.counters.ticks - self._rate_mark[1]) / ((now - self._rate_mark[0]) / 1e9)
        self._rate_mark = (now, self.counters.ticks)

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
    def _admit(self, frame: bytes, t_recv: int) -> tuple[P.Message, int] | None:
        """Checks on receipt: (message, age in ns) for a state worth answering, else None (counted).
        A rejected frame never takes the place of a pending good state."""
        try:
            msg = P.decode(frame)
        except P.ProtocolError:
            self.counters.malformed += 1
            return None
        if msg.type != P.MsgType.STATE:
            self.counters.malformed += 1
            return None
        restart = bool(msg.flags & P.StateFlag.RESTART) and msg.seq <= 1  # the robot's first state after its (re)start
        # Re-sync: after max_consecutive_stale states in a row rejected for their seq or their
        # clock, the stream itself has changed (a robot restarted without its flag, a forged seq
        # or clock): take this state as the new reference, and safe-stop, so that acting on the
        # new stream needs an operator's ARM.
        resync = restart or self._consecutive_rejected >= self.profile.max_consecutive_stale
        if resync and not restart:
            self.counters.resyncs += 1
            self._event(Event.RESYNC, f"re-synchronised to the state stream after {self._consecutive_rejected} "
                                      "rejected states: ARM to continue")
        if self._last_state_seq is not None and msg.seq <= self._last_state_seq and not resync:
            self.counters.replayed += 1  # old, replayed or out-of-order: never act on it
            self._consecutive_rejected += 1
            return None
        transit = t_recv - msg.t_ns
        if self.profile.same_clock:
            # One clock (one host, or clocks synchronised by PTP): the age is the transit time.
            # A state "from the future" by more than the staleness limit is a clock jump or a
            # forged time: never acted on.
            if transit < -self.stale_ns:
                self.counters.clock_jumps += 1
                self._consecutive_rejected += 1
                return None
            self._offset_ns = 0
        else:
            # Two unsynchronised clocks: the offset is the smallest transit since the robot's start.
            self._offset_ns = transit if self._offset_ns is None or resync else min(self._offset_ns, transit)
        self._last_state_seq = msg.seq
        self._consecutive_rejected = 0
        return msg, transit - self._offset_ns

    def _answer(self, frame: bytes, t_recv: int) -> None:
        """Admit and act on one state frame at once (the loop admits on receipt, acts when due)."""
        admitted = self._admit(frame, t_recv)
        if admitted is not None:
            self._act(*admitted, t_recv)

    def _act(self, msg: P.Message, age: int, t_recv: int) -> None:
        """Answer an admitted state with exactly one command."""
        self.counters.ticks += 1
        obs = msg.payload
        usable, flags = self.safety.check_state(obs)
        stale = age > self.stale_ns
        if stale:
            self.counters.stale += 1
            flags |= P.TickFlag.STALE
            usable = False
        if usable:
            self._last_good_ns = t_recv
        policy_us = float("nan")
        cmd_flags = 0
        if usable:
            self._event(Event.GOOD_STATE, "first good state after arming")
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
                self._event(Event.MISSES, f"{self._consecutive_misses} consecutive deadline misses or bad actions")
            elif self._consecutive_stale >= self.profile.max_consecutive_stale:
                self._event(Event.STALE, f"{self._consecutive_stale} consecutive stale or invalid states")
        else:
            command = self.safety.safe_command()
            cmd_flags = int(P.CommandFlag.SAFE)
        self._cmd_seq += 1
        self.command_sock.send(P.encode(P.MsgType.COMMAND, self._cmd_seq, command, ref=msg.seq, flags=cmd_flags))
        t_send = time.monotonic_ns()
        if policy_us == policy_us and t_send - t_recv > self.budget_ns:
            self.counters.over_budget += 1  # a policy command sent after the budget (the process was descheduled)
        self.recorder.add(t_recv, t_send, msg.seq, msg.t_ns, policy_us, int(self.state), flags, command,
                          obs if obs.shape == (self.profile.obs_dim,) else None)

    # --- the loop ---------------------------------------------------------------------------
    def _periodic(self, now: int) -> None:
        """Once a period: without a usable state for stale_periods, count a stale tick; safe-stop
        at the last check inside (stale_periods + max_consecutive_stale) periods of the last one."""
        if self.state == P.NodeState.RUNNING and self._last_good_ns is not None and now - self._last_good_ns > self.stale_ns:
            self.counters.stale += 1
            self._consecutive_stale += 1
            # The next check comes a period later, plus up to POLL_SLACK_NS (poll() rounds up).
            if now - self._last_good_ns + self.period_ns + POLL_SLACK_NS >= self.no_state_limit_ns:
                self._event(Event.STALE, f"no fresh state for {(now - self._last_good_ns) / 1e6:.1f} ms")

    def request_stop(self, *_) -> None:
        self._stop = True

    def run(self, duration_s: float | None = None, status_every_s: float = 1.0, status=None) -> None:
        if self.realtime is None:
            self.apply_realtime()  # on this thread: the loop's
        gc.freeze()  # what exists now (model, sockets, buffers) is never scanned again: shorter GC pauses
        poller = zmq.Poller()
        poller.register(self.state_sock, zmq.POLLIN)
        poller.register(self.control_sock, zmq.POLLIN)
        start = deadline = time.monotonic_ns()
        end = None if duration_s is None else start + int(duration_s * 1e9)
        next_status = start + int(status_every_s * 1e9)
        self._mark_rate(start)
        min_gap = self.period_ns // 2
        while not self._stop and (end is None or time.monotonic_ns() < end):
            now = time.monotonic_ns()
            wake = deadline + self.period_ns
            if self._pending is not None:
                wake = min(wake, self._last_eval_ns + min_gap)
            # Around the expected arrival of the next state, spin (poll without blocking): a core
            # that went idle takes hundreds of microseconds to wake on a message.
            if self._expected_ns is not None and self.spin_ns:
                spin_from, spin_to = self._expected_ns - self.spin_ns, self._expected_ns + self.spin_ns
                if spin_from <= now < spin_to:
                    wake = now
                elif now < spin_from:
                    wake = min(wake, spin_from)
            # Wait in poll(), which wakes the moment a message comes. It counts whole milliseconds,
            # so round up: periodic work may run up to 1 ms late, answers never. A state held back
            # by the flood guard is due at an exact time: sleep to it (a newer state would only
            # replace it, and is read right after).
            left = wake - now
            if self._pending is not None and 0 < left < 1_500_000:
                time.sleep(left / 1e9)
                left = 0
            events = dict(poller.poll(-(-left // 1_000_000) if left > 0 else 0))
            try:
                if self.state_sock in events:
                    try:
                        frame, t_recv = self.state_sock.recv(zmq.NOBLOCK), time.monotonic_ns()
                        admitted = self._admit(frame, t_recv)
                        if admitted is not None:
                            self._pending = (admitted, t_recv)
                    except zmq.Again:
                        pass
                now = time.monotonic_ns()
                if self._pending is not None:
                    if now - self._last_eval_ns >= min_gap:
                        (msg, age), t_recv = self._pending
                        self._pending = None
                        self._last_eval_ns = now
                        self._expected_ns = t_recv + self.period_ns
                        self._act(msg, age, t_recv)
                if self.control_sock in events:
                    self._handle_control()  # after the state: a control flood cannot delay an answer
                if now >= deadline + self.period_ns:
                    deadline += (now - deadline) // self.period_ns * self.period_ns
                    self._periodic(now)
                if now >= next_status:
                    next_status += int(status_every_s * 1e9)
                    self._mark_rate(now)
                    if status is not None:
                        status(self)
            except Exception as exc:  # never let the loop die: go to FAULT and keep answering safely
                self.counters.errors += 1
                self._event(Event.ERROR, f"internal error: {type(exc).__name__}: {exc}")
        # Hand over: one last safe command, then the robot's watchdog is in charge.
        self._cmd_seq += 1
        self.command_sock.send(P.encode(P.MsgType.COMMAND, self._cmd_seq, self.safety.safe_command(),
                                        ref=self._last_state_seq or 0, flags=int(P.CommandFlag.SAFE)))

    def close(self) -> None:
        self.runner.close()
        for s in (self.state_sock, self.command_sock, self.control_sock):
            s.close(0)
        if self.curve is not None:
            self.curve.stop()


def install_signal_handlers(node: ServeNode) -> None:
    signal.signal(signal.SIGINT, node.request_stop)
    signal.signal(signal.SIGTERM, node.request_stop)
