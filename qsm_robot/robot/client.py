"""The reference robot-side client of the control protocol (docs/PROTOCOL.md, "The robot side").

It imports only numpy, pyzmq and the torch-free protocol, auth and profile modules, so it runs
on a robot computer with the ``deploy`` extra. ``qsm-sim`` (``qsm_robot.robot.node``) is this
client driving dm_control physics; an integrator wraps real hardware the same way:

    class MyArm(Robot):
        def observe(self) -> np.ndarray:           # float32, the policy's observation layout
            return read_sensors()
        def apply(self, command: np.ndarray) -> None:  # actuator units, once per period
            write_actuators(command)

    client = RobotClient(Profile.load("deploy/profiles/arm.json"), MyArm(), key="robot.key_secret")
    report = client.run()            # until client.request_stop() (e.g. from a signal handler)
    client.close()

Every period, on absolute deadlines of the monotonic clock, :meth:`RobotClient.run` does

1. read:   ``robot.observe()`` and publish it as a STATE;
2. update: collect COMMANDs until the one answering that state arrives or the cutoff (90% of the
   period) passes; :class:`CommandGate` (the rules, no sockets, no clock) picks the command;
3. write:  ``robot.apply(command)``, then sleep to the next deadline.

The rules (CommandGate): the command whose ``ref`` is the state just sent is applied as soon as
it arrives; if it is late, the newest valid command answering a recent state is applied at the
cutoff (one tick late), else the last command is held; within ``robot.watchdog_periods`` periods
of the last fresh command (at the last cutoff inside that time) the profile's safe command is
applied. Commands that are malformed, non-finite, of the wrong size or outside the actuator
bounds are rejected; with ``max_delta_per_tick`` in the profile, a command's change from the one
applied last is clamped to that limit (see :meth:`CommandGate.limit_change`). Everything is
counted in :class:`RobotReport`.
"""

from __future__ import annotations

import json
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zmq

from qsm_robot.serve import flight_record
from qsm_robot.serve import protocol as P
from qsm_robot.serve import realtime
from qsm_robot.serve.auth import secure_client
from qsm_robot.serve.profile import Profile, ProfileError

LATENCY_WINDOW = 1 << 20
"""The report's latency percentiles cover the last this many commands (8 MiB, fixed at start)."""
SENT_AT_WINDOW = 1000
"""Send times are kept for this many recent states (a command answering an older one has no latency)."""
ROBOT_FLAG = {name: 1 << i for i, name in enumerate(flight_record.ROBOT_FLAG_NAMES)}
"""The robot flight record's flag bits by name."""


class RobotError(ValueError):
    """A Robot implementation that breaks its contract (e.g. an observation of the wrong size)."""


class Robot(ABC):
    """What an integrator implements to put a robot (or a simulator) behind the protocol.

    The client calls ``observe()`` then ``apply()`` once per period, from one thread; both must
    return well within the period (the client does its own timing: do not sleep in them).
    """

    @abstractmethod
    def observe(self) -> np.ndarray:
        """The current observation: ``profile.obs_dim`` float32 values in the policy's layout
        (the model's ``obs_layout`` order), in the units the policy was trained on."""

    @abstractmethod
    def apply(self, command: np.ndarray) -> None:
        """Send ``command`` (``profile.act_dim`` float32 values, actuator units, within the
        profile's bounds) to the actuators. Called once per period with the fresh command, a
        one-tick-late one, the held one, or the profile's safe command (watchdog)."""

    def episode_done(self) -> bool:
        """Whether the current episode has ended (checked after each ``apply``). A real robot
        usually runs one endless episode: the default is False."""
        return False

    def reset(self) -> float | None:
        """Start a new episode after ``episode_done()``; return the finished episode's return
        (total reward) when the robot keeps one, else None. The next state carries the
        episode-start flag."""
        return None


@dataclass
class RobotReport:
    episodes: list = field(default_factory=list)
    """Return of each finished episode (NaN when the robot keeps none)."""
    steps: int = 0
    """Ticks on which a command was applied."""
    states_sent: int = 0
    commands_applied: int = 0
    """Ticks that applied a command received for this state or, one tick late, an earlier one."""
    commands_late: int = 0
    """Ticks without a fresh command by the cutoff (the last command was held, or the watchdog acted)."""
    commands_one_tick_late: int = 0
    """Ticks that applied a command answering an earlier state, because the current answer was late."""
    commands_rejected: int = 0
    """Commands dropped as non-finite, of the wrong size or outside the actuator bounds."""
    commands_rate_clamped: int = 0
    """Applied commands whose change from the last applied command exceeded the profile's
    max_delta_per_tick and was clamped to it (the robot's own rate limit, behind the node's)."""
    watchdog_trips: int = 0
    watchdog_ticks: int = 0
    """Ticks on which the safe command was applied by the watchdog."""
    watchdog_periods_to_safe: list = field(default_factory=list)
    """For each trip: periods between the last fresh command and the safe command."""
    watchdog_trip_t_ns: list = field(default_factory=list)
    """For each trip: monotonic time at which the safe command was applied."""
    watchdog_clear_t_ns: list = field(default_factory=list)
    """For each recovery after a trip: monotonic time at which a fresh command was applied again."""
    safe_commands_from_node: int = 0
    """Accepted commands flagged as the node's safe command (node not running, e-stop, safe-stop)."""
    restart_flagged: int = 0
    """States sent with the restart flag: from the start until the node answered one of them."""
    wrong_version: int = 0
    """Frames of another protocol version from the node (dropped; the first one is logged)."""
    latency_us: dict = field(default_factory=dict)
    """state sent -> command received, at the robot: p50, p99, p99.9, max (last LATENCY_WINDOW commands)."""
    achieved_rate_hz: float = 0.0
    ticks_late: int = 0
    """Ticks that started more than half a period after their deadline."""
    realtime: dict = field(default_factory=dict)
    """What the profile's ``robot.realtime`` settings came to on the loop thread (per setting:
    requested, 'off' / 'applied' / 'refused', and what is in force or why not)."""


class CommandGate:
    """The robot side's command rules, without sockets or clocks (see the module docstring).

    Per tick: ``state_sent(seq, t_ns)``, then ``offer(msg, now_ns)`` for each received message
    (True once the fresh answer is in), then ``decide()`` for the command to apply.
    """

    def __init__(self, profile: Profile, report: RobotReport, log: Callable[[str], None]):
        self.report, self.log = report, log
        self.low = np.array(profile.action_low, np.float32)
        """Actuator lower bounds (a command below them is rejected)."""
        self.high = np.array(profile.action_high, np.float32)
        """Actuator upper bounds (a command above them is rejected)."""
        self.safe = np.array(profile.safe_command, np.float32)
        """What the watchdog applies; also the command before the first one arrives."""
        self.max_delta = None if profile.max_delta_per_tick is None else np.array(profile.max_delta_per_tick, np.float64)
        """Per-actuator change limit per tick, or None (no limit)."""
        self.watchdog_periods = profile.robot.watchdog_periods
        self.applied = self.safe.copy()
        """The command applied last."""
        self.tick = 0
        """Ticks decided so far."""
        self.seq = 0
        """Sequence number of this tick's state (a state dropped on the way still uses one)."""
        self.last_fresh_tick = 0
        self.last_applied_ref = 0
        """The state answered by the command applied last: an answer to it or an older state is superseded."""
        self.watchdog_on = False
        self.fresh: np.ndarray | None = None
        """This tick's answer, once it has come."""
        self.late: P.Message | None = None
        """The newest valid answer to an earlier state received this tick."""
        self.sent_at: dict[int, int] = {}
        self.latencies = np.zeros(LATENCY_WINDOW, np.int64)
        self.n_latencies = 0
        self.fresh_latency_ns: int | None = None
        """This tick's state sent -> its command received, once it has come."""
        self.tick_flags = 0
        """The last decided tick's robot flags (bits of ``flight_record.ROBOT_FLAG_NAMES``)."""
        self.answered = False
        """Whether the node has answered a state of this run (the restart flag goes off then)."""

    def state_sent(self, seq: int, t_ns: int | None) -> None:
        """A new tick: the state ``seq`` went out at ``t_ns`` (None: it was not sent)."""
        self.seq, self.fresh, self.late, self.fresh_latency_ns = seq, None, None, None
        if t_ns is not None:
            self.sent_at[seq] = t_ns
        self.sent_at.pop(seq - SENT_AT_WINDOW, None)  # seqs only grow: forget the one that just aged out

    def valid(self, command: np.ndarray) -> bool:
        """Right size, finite and within the actuator bounds."""
        return (command.shape == self.low.shape and bool(np.isfinite(command).all())
                and bool(((command >= self.low) & (command <= self.high)).all()))

    def offer(self, msg: P.Message, now_ns: int) -> bool:
        """Take one received message; True once the command answering this tick's state is in."""
        if msg.type != P.MsgType.COMMAND:
            return False
        if msg.ref in self.sent_at:
            latency = now_ns - self.sent_at.pop(msg.ref)
            self.latencies[self.n_latencies % LATENCY_WINDOW] = latency
            self.n_latencies += 1
            if msg.ref == self.seq:
                self.fresh_latency_ns = latency
        if msg.ref > self.seq or msg.ref < 1:
            return False  # answers no state of ours
        self.answered = True  # the node took a state of this run: the restart is through
        if msg.ref <= self.last_applied_ref or msg.ref < self.seq - self.watchdog_periods:
            return False  # already superseded, or too old to be fresh
        if not self.valid(msg.payload):
            self.report.commands_rejected += 1
            return False
        if msg.flags & int(P.CommandFlag.SAFE):
            self.report.safe_commands_from_node += 1
        if msg.ref == self.seq:
            self.fresh = msg.payload.copy()
            return True
        self.late = msg  # answers an earlier state: use it at the cutoff if nothing newer comes
        return False

    def limit_change(self, command: np.ndarray) -> np.ndarray:
        """Defence in depth behind the node's rate limiter: clamp each actuator's change from the
        command applied last to ``max_delta_per_tick`` (counted in ``commands_rate_clamped``).

        Clamped, not rejected: a rejected command would be replaced by the held one, and the next
        command would be just as far from it, so a large step would become a watchdog trip; a
        clamp moves toward the command at the permitted rate, as the node's limiter does. It also
        absorbs the honest disagreement between the node's reference (the command it sent last)
        and the robot's (the one applied last) after a late or held command. The safe command is
        exempt, whoever sends it (the watchdog, or the node on an e-stop or safe-stop): stopping
        beats smoothness, and a node can gain nothing by sending it. Float32 rounding of the
        node's own limit is not counted as a violation.
        """
        if self.max_delta is None or np.array_equal(command, self.safe):
            return command
        change = command.astype(np.float64) - self.applied
        rounding = 2 * np.spacing(np.maximum(np.abs(command), np.abs(self.applied))).astype(np.float64)
        over = np.abs(change) > self.max_delta + rounding
        if not over.any():
            return command
        self.report.commands_rate_clamped += 1
        limited = np.where(over, self.applied + np.sign(change) * self.max_delta, command)
        return np.clip(limited, self.low, self.high).astype(np.float32)  # the bounds always win

    def decide(self, now_ns: int) -> np.ndarray:
        """The command to apply this tick: the fresh one, else one tick late, else held, else
        (watchdog) the safe command."""
        report, command = self.report, None
        clamped_before, flags = report.commands_rate_clamped, 0
        if self.fresh is not None:
            command, self.last_applied_ref = self.fresh, self.seq
        elif self.late is not None:
            command, self.last_applied_ref = self.late.payload.copy(), self.late.ref
            report.commands_one_tick_late += 1
            flags |= ROBOT_FLAG["one_tick_late"]
        if command is not None:
            self.applied, self.last_fresh_tick = self.limit_change(command), self.tick
            report.commands_applied += 1
            if self.watchdog_on:
                report.watchdog_clear_t_ns.append(now_ns)
                self.log("watchdog: commands are back")
                self.watchdog_on = False
        else:
            report.commands_late += 1
            flags |= ROBOT_FLAG["late"]
            # At this cutoff, the next one would be more than watchdog_periods after the last
            # fresh command: act now, so the safe command comes within watchdog_periods.
            if self.tick - self.last_fresh_tick >= self.watchdog_periods - 1:
                if not self.watchdog_on:
                    self.watchdog_on = True
                    report.watchdog_trips += 1
                    report.watchdog_periods_to_safe.append(self.tick - self.last_fresh_tick)
                    report.watchdog_trip_t_ns.append(now_ns)
                    self.log(f"watchdog: no fresh command for {self.tick - self.last_fresh_tick} periods -> safe command")
                self.applied = self.safe.copy()
                report.watchdog_ticks += 1
                flags |= ROBOT_FLAG["watchdog"]
        if report.commands_rate_clamped > clamped_before:
            flags |= ROBOT_FLAG["rate_clamped"]
        self.tick_flags = flags
        self.tick += 1
        return self.applied.copy()

    def latency_us(self) -> dict[str, float]:
        """p50, p99, p99.9 and max of state-sent -> command-received, in microseconds ({} if none)."""
        lat = self.latencies[:min(self.n_latencies, LATENCY_WINDOW)] / 1e3
        if not len(lat):
            return {}
        return {f"p{q}": float(np.percentile(lat, q)) for q in (50, 99, 99.9)} | {"max": float(lat.max())}


def require_key(profile: Profile, key: str | None) -> None:
    """ProfileError unless a key pair is given where the profile uses CURVE."""
    if profile.curve is not None and key is None:
        raise ProfileError(f"profile {profile.name!r} uses CURVE: give the robot's key pair (--key ROBOT.key_secret)")


class RobotClient:
    """The protocol client: sockets, the timed loop and the hook points of a simulator.

    ``profile`` gives the endpoints, the period (``rate_hz``), the actuator bounds, the safe
    command, ``max_delta_per_tick``, ``spin_us``, ``robot.watchdog_periods``, ``robot.realtime``
    (applied to the loop's thread when ``run`` starts) and the CURVE server key; ``key`` is this robot's CURVE key pair (``.key_secret``), needed when the
    profile has CURVE keys. ``name`` prefixes the log lines (stderr by default).
    """

    def __init__(self, profile: Profile, robot: Robot, key: str | None = None,
                 log: Callable[[str], None] | None = None, name: str = "robot", record_ticks: int | None = None):
        """record_ticks: keep a flight record of the last this many ticks (a ring allocated now;
        ``save_record`` writes it as MCAP); None: no record."""
        require_key(profile, key)
        self.profile, self.robot, self.name = profile, robot, name
        self.recorder = None if not record_ticks else flight_record.TickRing(
            flight_record.robot_dtype(profile.obs_dim, profile.act_dim), record_ticks)
        self.realtime: realtime.RealtimeReport | None = None
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.ctx = zmq.Context.instance()
        self.state_sock = self.ctx.socket(zmq.PUB)
        self.cmd_sock = self.ctx.socket(zmq.SUB)
        if profile.curve is not None:
            for sock in (self.state_sock, self.cmd_sock):
                secure_client(sock, key, profile.curve.server_public_key)
        self.state_sock.setsockopt(zmq.LINGER, 0)
        self.state_sock.setsockopt(zmq.IMMEDIATE, 1)  # no node connected: drop states, never queue old ones for the next
        self.state_sock.setsockopt(zmq.SNDHWM, 10)
        self.state_sock.connect(profile.endpoints.state)
        self.cmd_sock.setsockopt(zmq.LINGER, 0)
        self.cmd_sock.setsockopt(zmq.CONFLATE, 1)  # only the newest command is kept
        self.cmd_sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.cmd_sock.connect(profile.endpoints.command)
        self._stop = False

    def log(self, message: str) -> None:
        self._log(f"{self.name}: {message}")

    def request_stop(self, *_) -> None:
        """End run() after the current tick (safe to call from a signal handler)."""
        self._stop = True

    # --- hook points: a simulator overrides these to inject faults; hardware leaves them ------
    def before_tick(self) -> bool:
        """Called at the start of each tick; return True when the robot stalled (e.g. an
        injected pause), so that the schedule restarts from now instead of catching up."""
        return False

    def send_state(self, obs: np.ndarray, seq: int, flags: int) -> int | None:
        """Publish ``obs`` as the STATE ``seq``; return its send time (monotonic ns), or None
        when no state went out (an injected drop or garbage frame)."""
        t = time.monotonic_ns()
        self.state_sock.send(P.encode(P.MsgType.STATE, seq, obs, flags=flags, t_ns=t))
        return t

    # --- the loop -------------------------------------------------------------------------------
    def observe(self) -> np.ndarray:
        """The robot's observation, checked against the profile (RobotError if it does not fit)."""
        obs = self.robot.observe()
        if not isinstance(obs, np.ndarray) or obs.dtype != np.float32 or obs.shape != (self.profile.obs_dim,):
            got = f"{obs.dtype} {obs.shape}" if isinstance(obs, np.ndarray) else type(obs).__name__
            raise RobotError(f"Robot.observe() must return float32 of shape ({self.profile.obs_dim},) "
                             f"(profile {self.profile.name!r}), got {got}")
        return obs

    def _collect(self, gate: CommandGate, poller: zmq.Poller, cutoff: int, spin_ns: int) -> None:
        """Feed received messages to the gate until its fresh command is in or the cutoff passes."""
        spin_until = time.monotonic_ns() + 2 * spin_ns  # the answer usually comes within this
        while not self._stop:
            now = time.monotonic_ns()
            left = cutoff - now
            if left <= 0:
                return
            if now < spin_until:
                ready = poller.poll(0)
            elif left >= 1_000_000:
                ready = poller.poll(left // 1_000_000)  # whole milliseconds, rounded down: never past the cutoff
            else:  # under a millisecond left: short sleeps cannot overshoot the cutoff
                time.sleep(min(left, 100_000) / 1e9)
                ready = poller.poll(0)
            if not ready:
                continue
            try:
                msg = P.decode(self.cmd_sock.recv(zmq.NOBLOCK))
            except P.VersionError as exc:
                if not gate.report.wrong_version:
                    self.log(f"the node sent a frame of {exc}")
                gate.report.wrong_version += 1
                continue
            except (zmq.Again, P.ProtocolError):
                continue
            if gate.offer(msg, time.monotonic_ns()):
                return

    def run(self, episodes: int | None = None, connect_wait_s: float = 0.5, first_seq: int = 1) -> RobotReport:
        """Run the control loop until ``request_stop()`` or, with ``episodes``, until that many
        episodes have ended; return the report. ``first_seq``: the first state's seq (1; the
        campaigns start higher to check 64-bit refs)."""
        prof = self.profile
        period = int(round(prof.period_s * 1e9))
        spin_ns = int(prof.spin_us * 1e3)
        report = RobotReport()
        rt = self.realtime = realtime.apply(prof.robot.realtime, prof.spin_us)  # this thread runs the loop
        for line in rt.warnings():
            self.log(line)
        if not prof.robot.realtime.is_default:
            self.log(rt.banner())
        report.realtime = rt.to_dict()
        gate = CommandGate(prof, report, self.log)
        time.sleep(connect_wait_s)  # let the PUB/SUB connections form before the first state
        seq, ep_steps, flags = first_seq - 1, 0, int(P.StateFlag.EPISODE_START)
        start = deadline = time.monotonic_ns()
        poller = zmq.Poller()
        poller.register(self.cmd_sock, zmq.POLLIN)
        while not self._stop and (episodes is None or len(report.episodes) < episodes):
            if time.monotonic_ns() - deadline > period // 2:
                report.ticks_late += 1
            if self.before_tick():
                deadline = time.monotonic_ns()
            # 1. read: observe and publish the state
            obs = self.observe()
            seq += 1
            if not gate.answered:  # restart flag on every state until the node answers one (PROTOCOL.md, Restarts)
                flags |= int(P.StateFlag.RESTART)
                report.restart_flagged += 1
            sent_flags = flags
            t_sent = self.send_state(obs, seq, flags)
            if t_sent is not None:
                report.states_sent += 1
                flags = 0
            gate.state_sent(seq, t_sent)
            # 2. update: wait for the command that answers it, until 90% of the period
            self._collect(gate, poller, deadline + period - period // 10, spin_ns)
            command = gate.decide(time.monotonic_ns())
            # 3. write: apply it
            t_apply = time.monotonic_ns()
            self.robot.apply(command)
            if self.recorder is not None:
                r = self.recorder.next_row()
                r["seq"], r["t_sent_ns"], r["t_apply_ns"], r["ref"] = seq, t_sent or 0, t_apply, gate.last_applied_ref
                r["command_us"] = np.nan if gate.fresh_latency_ns is None else gate.fresh_latency_ns / 1e3
                r["flags"] = (gate.tick_flags | (ROBOT_FLAG["not_sent"] if t_sent is None else 0)
                              | (ROBOT_FLAG["episode_start"] if sent_flags & P.StateFlag.EPISODE_START else 0))
                r["command"], r["obs"] = command, obs
            report.steps += 1
            ep_steps += 1
            if self.robot.episode_done():
                ret = self.robot.reset()
                report.episodes.append(float("nan") if ret is None else float(ret))
                self.log(f"episode {len(report.episodes)}: return {report.episodes[-1]:.1f} ({ep_steps} steps)")
                ep_steps, flags = 0, flags | int(P.StateFlag.EPISODE_START)
            # 4. sleep to the next absolute deadline (sleep most of it, spin the last 200 us)
            deadline += period
            while (left := deadline - time.monotonic_ns()) > 0:
                if left > 300_000:
                    time.sleep((left - 200_000) / 1e9)
        elapsed = (time.monotonic_ns() - start) / 1e9
        report.achieved_rate_hz = gate.tick / elapsed if elapsed > 0 else 0.0
        report.latency_us = gate.latency_us()
        return report

    def save_record(self, path, **meta) -> Path:
        """Write the flight record (the last ``record_ticks`` ticks) as MCAP, atomically: channels
        /states, /commands, /latencies, /flags (``serve/flight_record.py``); ``meta`` goes into its
        ``qsm_robot`` metadata record."""
        if self.recorder is None:
            raise ValueError("this client keeps no flight record: pass record_ticks")
        meta = {"obs_dim": self.profile.obs_dim, "act_dim": self.profile.act_dim,
                "flag_names": list(flight_record.ROBOT_FLAG_NAMES), "total_ticks": self.recorder.total,
                "ticks_held": len(self.recorder.data), "profile": json.dumps(self.profile.to_dict()),
                **({"realtime": json.dumps(self.realtime.to_dict())} if self.realtime else {}), **meta}
        return flight_record.write(path, "robot", flight_record.robot_messages(self.recorder.data), meta,
                                   flight_record.monotonic_to_unix_ns())

    def close(self) -> None:
        self.state_sock.close(0)
        self.cmd_sock.close(0)
