"""qsm-sim: a MuJoCo robot node that stands in for hardware.

Every period (absolute deadlines on the monotonic clock) it publishes the state, waits for the
command that answers it (until 90% of the period), applies it and steps the physics: on time,
this is exactly ``env.step(policy(obs))``. If that answer is late, it applies the newest unused
command answering a recent state (counted as one tick late), else holds the last command; within
``watchdog_periods`` periods of the last fresh command it applies its safe command and reports
it, never replaying an old command for ever. Commands that are malformed, non-finite or out of
bounds are rejected and counted.
Faults (scenario file): added latency and jitter before publishing, dropped states, NaN or
garbage states, a pause.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zmq

from qsm_robot.envs import env_info, make_env
from qsm_robot.serve import protocol as P
from qsm_robot.serve.auth import AuthError, secure_client
from qsm_robot.serve.profile import Profile, ProfileError


@dataclass
class Faults:
    latency_ms: float = 0.0
    """Added before each state is published."""
    jitter_ms: float = 0.0
    """Uniform +- jitter on top of latency_ms."""
    drop_prob: float = 0.0
    """Probability that a state is not published at all."""
    nan_prob: float = 0.0
    """Probability that a state's payload is NaN."""
    garbage_prob: float = 0.0
    """Probability that random bytes are sent instead of a state."""
    pause_at_s: float | None = None
    """Seconds after the start at which the robot stalls (no states, no physics)."""
    pause_s: float = 0.0


@dataclass
class Scenario:
    name: str
    seed: int = 0
    episodes: int = 1
    episode_steps: int | None = None
    """Override of the profile's robot.episode_steps."""
    faults: Faults = field(default_factory=Faults)

    @classmethod
    def load(cls, path: str | Path) -> "Scenario":
        try:
            data = json.loads(Path(path).read_text())
            data["faults"] = Faults(**data.get("faults", {}))
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ProfileError(f"scenario {path}: {exc}") from None


@dataclass
class RobotReport:
    episodes: list = field(default_factory=list)
    """Return of each finished episode."""
    steps: int = 0
    states_sent: int = 0
    commands_applied: int = 0
    commands_late: int = 0
    """Ticks without a fresh command by the cutoff (the last command was held, or the watchdog acted)."""
    commands_one_tick_late: int = 0
    """Ticks that applied a command answering an earlier state, because the current answer was late."""
    commands_rejected: int = 0
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
    latency_us: dict = field(default_factory=dict)
    """state sent -> command received, at the robot: p50, p99, p99.9, max."""
    achieved_rate_hz: float = 0.0
    ticks_late: int = 0
    """Ticks that started more than half a period after their deadline."""


class RobotNode:
    def __init__(self, profile: Profile, scenario: Scenario, log=None, key: str | None = None):
        """key: this robot's CURVE key pair (.key_secret), needed when the profile has CURVE keys."""
        if profile.curve is not None and key is None:
            raise ProfileError(f"profile {profile.name!r} uses CURVE: give the robot's key pair (--key ROBOT.key_secret)")
        self.profile, self.scenario = profile, scenario
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        # Physics control steps per tick: the profile's period over the task's control step (a 50 Hz
        # profile on a 100 Hz task holds each command for 2 steps, as action_repeat=2 did in training).
        base_period = env_info(make_env(profile.task)).control_period_s
        self.action_repeat = max(1, round(profile.period_s / base_period))
        self.env = make_env(profile.task, seed=scenario.seed, action_repeat=self.action_repeat, rescale_actions=False)
        self.low, self.high = np.array(profile.action_low, np.float32), np.array(profile.action_high, np.float32)
        self.safe = np.array(profile.safe_command, np.float32)
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
        self.cmd_sock.setsockopt(zmq.CONFLATE, 1)
        self.cmd_sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.cmd_sock.connect(profile.endpoints.command)
        self.rng = np.random.default_rng(scenario.seed + 1)
        self._stop = False

    def request_stop(self, *_) -> None:
        self._stop = True

    def _valid_command(self, msg: P.Message) -> bool:
        c = msg.payload
        return c.shape == self.low.shape and bool(np.isfinite(c).all()) and bool(((c >= self.low) & (c <= self.high)).all())

    def run(self, connect_wait_s: float = 0.5) -> RobotReport:
        prof, faults = self.profile, self.scenario.faults
        period = int(round(1e9 / prof.rate_hz))
        spin_ns = int(prof.spin_us * 1e3)
        episode_steps = self.scenario.episode_steps or prof.robot.episode_steps
        report = RobotReport()
        sent_at: dict[int, int] = {}
        latencies: list[int] = []
        time.sleep(connect_wait_s)  # let the PUB/SUB connections form before the first state
        obs = self.env.reset()[0]
        applied = self.safe.copy()
        last_fresh_tick, tick, seq, ep_steps, ep_return, last_applied_ref = 0, 0, 0, 0, 0.0, 0
        watchdog_on, flags = False, 2 | 1  # restart + episode start on the first state
        start = deadline = time.monotonic_ns()
        pause_at = None if faults.pause_at_s is None else start + int(faults.pause_at_s * 1e9)
        poller = zmq.Poller()
        poller.register(self.cmd_sock, zmq.POLLIN)
        while not self._stop and len(report.episodes) < self.scenario.episodes:
            now = time.monotonic_ns()
            if now - deadline > period // 2:
                report.ticks_late += 1
            if pause_at is not None and now >= pause_at:
                self.log(f"qsm-sim: fault: pausing {faults.pause_s} s")
                time.sleep(faults.pause_s)
                pause_at = None
                deadline = time.monotonic_ns()
            # 1. publish the state (with the scenario's faults)
            if faults.latency_ms or faults.jitter_ms:
                time.sleep(max(0.0, faults.latency_ms + self.rng.uniform(-1, 1) * faults.jitter_ms) / 1e3)
            seq += 1
            draw = self.rng.random(3)
            if draw[0] < faults.drop_prob:
                pass
            elif draw[1] < faults.garbage_prob:
                self.state_sock.send(self.rng.bytes(int(self.rng.integers(0, 200))))
            else:
                payload = np.full_like(obs, np.nan) if draw[2] < faults.nan_prob else obs
                t = time.monotonic_ns()
                self.state_sock.send(P.encode(P.MsgType.STATE, seq, payload, flags=flags, t_ns=t))
                sent_at[seq] = t
                report.states_sent += 1
                flags = 0
            # 2. wait for the command that answers it, until 90% of the period
            cutoff = deadline + period - period // 10
            spin_until = time.monotonic_ns() + 2 * spin_ns  # the answer usually comes within this
            command = late = None
            while command is None and not self._stop:
                now = time.monotonic_ns()
                left = cutoff - now
                if left <= 0:
                    break
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
                except (zmq.Again, P.ProtocolError):
                    continue
                if msg.type != P.MsgType.COMMAND:
                    continue
                if msg.ref in sent_at:
                    latencies.append(time.monotonic_ns() - sent_at.pop(msg.ref))
                if msg.ref > seq or msg.ref <= last_applied_ref or msg.ref < seq - prof.robot.watchdog_periods:
                    continue  # answers no state of ours, already superseded, or too old to be fresh
                if not self._valid_command(msg):
                    report.commands_rejected += 1
                    continue
                if msg.flags & int(P.CommandFlag.SAFE):
                    report.safe_commands_from_node += 1
                if msg.ref == seq:
                    command, late = msg.payload.copy(), None
                else:
                    late = msg  # answers an earlier state: use it at the cutoff if nothing newer comes
            if command is None and late is not None:
                command = late.payload.copy()
                report.commands_one_tick_late += 1
                last_applied_ref = late.ref
            elif command is not None:
                last_applied_ref = seq
            # 3. apply: the fresh command, else hold, else (watchdog) the safe command
            if command is not None:
                applied, last_fresh_tick = command, tick
                report.commands_applied += 1
                if watchdog_on:
                    report.watchdog_clear_t_ns.append(time.monotonic_ns())
                    self.log("qsm-sim: watchdog: commands are back")
                    watchdog_on = False
            else:
                report.commands_late += 1
                # At this cutoff, the next one would be more than watchdog_periods after the last
                # fresh command: act now, so the safe command comes within watchdog_periods.
                if tick - last_fresh_tick >= prof.robot.watchdog_periods - 1:
                    if not watchdog_on:
                        watchdog_on = True
                        report.watchdog_trips += 1
                        report.watchdog_periods_to_safe.append(tick - last_fresh_tick)
                        report.watchdog_trip_t_ns.append(time.monotonic_ns())
                        self.log(f"qsm-sim: watchdog: no fresh command for {tick - last_fresh_tick} periods -> safe command")
                    applied = self.safe.copy()
                    report.watchdog_ticks += 1
            obs, reward, terminated, truncated, _ = self.env.step(applied)
            ep_return += float(reward)
            ep_steps += 1
            report.steps += 1
            tick += 1
            if terminated or truncated or ep_steps >= episode_steps:
                report.episodes.append(ep_return)
                self.log(f"qsm-sim: episode {len(report.episodes)}: return {ep_return:.1f} ({ep_steps} steps)")
                obs, ep_steps, ep_return, flags = self.env.reset()[0], 0, 0.0, 1
            sent_at.pop(seq - 1000, None)  # seqs only grow: forget the one that just aged out
            # 4. sleep to the next absolute deadline (sleep most of it, spin the last 200 us)
            deadline += period
            while (left := deadline - time.monotonic_ns()) > 0:
                if left > 300_000:
                    time.sleep((left - 200_000) / 1e9)
        elapsed = (time.monotonic_ns() - start) / 1e9
        report.achieved_rate_hz = tick / elapsed if elapsed > 0 else 0.0
        lat = np.array(latencies) / 1e3
        report.latency_us = {f"p{q}": float(np.percentile(lat, q)) for q in (50, 99, 99.9)} | {"max": float(lat.max())} if len(lat) else {}
        return report

    def close(self) -> None:
        self.state_sock.close(0)
        self.cmd_sock.close(0)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="qsm-sim", description="Simulated robot node for qsm-serve (MuJoCo, dm_control).")
    p.add_argument("--profile", required=True, help="deployment profile JSON (deploy/profiles/)")
    p.add_argument("--scenario", required=True, help="scenario JSON (sim/scenarios/)")
    p.add_argument("--episodes", type=int, help="override the scenario's episode count")
    p.add_argument("--results", type=Path, help="write the robot's report as JSON here")
    p.add_argument("--key", help="this robot's CURVE key pair (.key_secret) when the profile has CURVE keys")
    a = p.parse_args(argv)
    try:
        profile, scenario = Profile.load(a.profile), Scenario.load(a.scenario)
        if a.episodes:
            scenario.episodes = a.episodes
        node = RobotNode(profile, scenario, key=a.key)
    except (ProfileError, AuthError) as exc:
        print(f"qsm-sim: error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, node.request_stop)
    signal.signal(signal.SIGTERM, node.request_stop)
    try:
        report = node.run()
    finally:
        node.close()
    if a.results:
        a.results.parent.mkdir(parents=True, exist_ok=True)
        a.results.write_text(json.dumps(asdict(report), indent=2))
    lat = report.latency_us
    print(f"qsm-sim: {len(report.episodes)} episode(s), returns {[round(r, 1) for r in report.episodes]}, "
          f"{report.achieved_rate_hz:.1f} Hz, latency p50 {lat.get('p50', float('nan')):.0f} us "
          f"p99.9 {lat.get('p99.9', float('nan')):.0f} us, late {report.commands_late}, watchdog trips {report.watchdog_trips}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
