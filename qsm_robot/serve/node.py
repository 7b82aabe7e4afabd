"""The serving node's loop: ZeroMQ sockets and timing around the socket-free core (serve/core.py).

read -> update -> write, as in ros2_control: the loop reads state and control frames and the
clock, the core decides (admission, state machine, policy, safety chain, telemetry), the loop
writes the bytes the core returns. Nothing here decides how a state is answered.

Timing: each STATE is answered as soon as it arrives (the policy runs on a worker thread and the
tick gives up on it at the budget, sending the fallback command). Periodic work (staleness,
status) runs on an absolute schedule of the monotonic clock: deadline k is t0 + k * period,
never "one period after the work". The flood guard (``core.FloodGuard``) evaluates at most two
states back to back and two per period on average: a late state and the on-time one after it are
both answered at once, and a flood cannot drive the policy faster than twice the nominal rate.

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
from pathlib import Path

import zmq

from qsm_robot.serve import protocol as P
from qsm_robot.serve import realtime
from qsm_robot.serve.auth import CurveServer
from qsm_robot.serve.core import NodeCore
from qsm_robot.serve.policy_runner import PolicyRunner
from qsm_robot.serve.profile import Profile


def is_loopback(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0]
    return endpoint.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "[::1]", "::1")


def bind_sockets(ctx: zmq.Context, profile: Profile, curve: CurveServer | None = None):
    """The node's three sockets, bound with their options: (state SUB, command PUB, control ROUTER).
    benchmarks/serve_floor.py binds the same ones for its bare round trip."""

    def bind(kind: int, endpoint: str, conflate: bool) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.secure(sock)
        if conflate:
            sock.setsockopt(zmq.CONFLATE, 1)  # keep only the newest message: never act on a queue of old states
        else:
            sock.setsockopt(zmq.SNDHWM, 100)
            sock.setsockopt(zmq.RCVHWM, 100)
        if kind in (zmq.ROUTER, zmq.SUB):  # no valid message is larger: ZeroMQ drops the frame and its sender's connection
            sock.setsockopt(zmq.MAXMSGSIZE, 4096 if kind == zmq.ROUTER else P.HEADER_SIZE + 4 * P.MAX_COUNT)
        sock.bind(endpoint)
        return sock

    state = bind(zmq.SUB, profile.endpoints.state, conflate=True)
    state.setsockopt(zmq.SUBSCRIBE, b"")
    return state, bind(zmq.PUB, profile.endpoints.command, False), bind(zmq.ROUTER, profile.endpoints.control, False)


class ServeNode:
    """The ZeroMQ loop around a :class:`NodeCore`: binds the three sockets, applies the real-time
    settings, and runs ``read -> core -> write`` on the monotonic clock."""

    def __init__(self, model: str | Path, profile: Profile, seed: int = 0, log=None, allow_remote: bool = False,
                 calibration_id: str | None = None, runner: PolicyRunner | None = None):
        """profile: with a calibration record's values already applied (``CalibrationRecord.apply``);
        calibration_id: that record's short id, reported in the status; runner: the policy runner
        (default ``PolicyRunner(model, seed)``; fault injection passes a wrapped one,
        ``serve/fault_injection.py``)."""
        self.profile, self.log = profile, log or (lambda m: print(m, file=sys.stderr, flush=True))
        remote = [f"{name}={endpoint}" for name, endpoint in vars(profile.endpoints).items() if not is_loopback(endpoint)]
        if remote and profile.curve is None:
            if not allow_remote:
                raise ValueError(f"endpoints {', '.join(remote)} are not loopback and the profile has no CURVE keys: "
                                 "configure 'curve' (qsm-serve keygen) or pass --allow-remote to expose the node "
                                 "unauthenticated")
            self.log(f"qsm-serve: WARNING: {', '.join(remote)} bound beyond this host WITHOUT authentication: anyone "
                     "who can reach it can send states and arm, disarm or e-stop the node. Configure 'curve'.")
        runner = runner if runner is not None else PolicyRunner(model, seed=seed)
        self.ctx = zmq.Context.instance()
        self.curve = CurveServer(self.ctx, profile.curve) if profile.curve is not None else None
        self.core = NodeCore(profile, runner, calibration_id, self.log,
                             auth_denied=lambda: self.curve.denied if self.curve else 0)
        self._stop = False
        self.spin_ns = int(profile.spin_us * 1e3)
        self._expected_ns: int | None = None  # when the next state should arrive
        self._rate_hz = 0.0
        self._rate_mark: tuple[int, int] | None = None  # (time, ticks) at the last status interval

        self.state_sock, self.command_sock, self.control_sock = bind_sockets(self.ctx, profile, self.curve)

    def apply_realtime(self) -> realtime.RealtimeReport:
        """Apply the profile's ``realtime`` settings to the calling thread, which must be the one
        that runs the loop (``run`` does it when nobody did); each refused setting is logged as one
        warning and the node runs on without it. Never raises."""
        self.core.realtime = realtime.apply(self.profile.realtime, self.profile.spin_us)
        for line in self.core.realtime.warnings():
            self.log(f"qsm-serve: {line}")
        return self.core.realtime

    def _handle_control(self, most: int = 8) -> None:
        """At most ``most`` control messages per loop turn: a flood of them cannot starve the loop."""
        for _ in range(most):
            try:
                parts = self.control_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 2:
                self.core.counters.malformed += 1
                continue
            identity, frame = parts
            reply = self.core.control(frame)
            if reply is not None:
                try:
                    self.control_sock.send_multipart([identity, reply], zmq.NOBLOCK)
                except zmq.Again:
                    pass

    @property
    def rate_hz(self) -> float:
        """States answered per second over the last status interval of ``run`` (0 before the first)."""
        return self._rate_hz

    def _mark_rate(self, now: int) -> None:
        ticks = self.core.counters.ticks
        if self._rate_mark is not None and now > self._rate_mark[0]:
            self._rate_hz = (ticks - self._rate_mark[1]) / ((now - self._rate_mark[0]) / 1e9)
        self._rate_mark = (now, ticks)

    def request_stop(self, *_) -> None:
        self._stop = True

    def run(self, duration_s: float | None = None, status_every_s: float = 1.0, status=None) -> None:
        """Serve until ``request_stop`` or ``duration_s``; ``status(node)`` is called every
        ``status_every_s``. Ends with one safe command."""
        core = self.core
        if core.realtime is None:
            self.apply_realtime()  # on this thread: the loop's
        gc.freeze()  # what exists now (model, sockets, buffers) is never scanned again: shorter GC pauses
        poller = zmq.Poller()
        poller.register(self.state_sock, zmq.POLLIN)
        poller.register(self.control_sock, zmq.POLLIN)
        period = core.period_ns
        start = deadline = time.monotonic_ns()
        end = None if duration_s is None else start + int(duration_s * 1e9)
        next_status = start + int(status_every_s * 1e9)
        self._mark_rate(start)
        while not self._stop and (end is None or time.monotonic_ns() < end):
            now = time.monotonic_ns()
            wake = deadline + period
            due = core.due_at(now)
            if due is not None:
                wake = min(wake, due)
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
            if due is not None and 0 < left < 1_500_000:
                time.sleep(left / 1e9)
                left = 0
            events = dict(poller.poll(-(-left // 1_000_000) if left > 0 else 0))
            try:
                if self.state_sock in events:  # read
                    try:
                        frame, t_recv = self.state_sock.recv(zmq.NOBLOCK), time.monotonic_ns()
                        core.hold(core.admit(frame, t_recv))
                    except zmq.Again:
                        pass
                now = time.monotonic_ns()
                admitted = core.take_due(now)
                if admitted is not None:
                    self._expected_ns = admitted.t_recv + period
                    answer = core.act(admitted)  # update
                    self.command_sock.send(answer.frame)  # write
                    core.record(answer, time.monotonic_ns())
                if self.control_sock in events:
                    self._handle_control()  # after the state: a control flood cannot delay an answer
                if now >= deadline + period:
                    deadline += (now - deadline) // period * period
                    core.periodic(now)
                if now >= next_status:
                    next_status += int(status_every_s * 1e9)
                    self._mark_rate(now)
                    if status is not None:
                        status(self)
            except Exception as exc:  # never let the loop die: go to FAULT and keep answering safely
                core.error(exc)
        # Hand over: one last safe command, then the robot's watchdog is in charge.
        self.command_sock.send(core.handover_frame())

    def close(self) -> None:
        self.core.runner.close()
        for s in (self.state_sock, self.command_sock, self.control_sock):
            s.close(0)
        if self.curve is not None:
            self.curve.stop()


def install_signal_handlers(node: ServeNode) -> None:
    signal.signal(signal.SIGINT, node.request_stop)
    signal.signal(signal.SIGTERM, node.request_stop)
