"""qsm-sim: a MuJoCo robot node that stands in for hardware.

It is the reference robot client (:mod:`qsm_robot.robot.client`: the protocol, the command
rules, the watchdog, the timing) driving a dm_control task's physics (:class:`SimRobot`), plus
the scenario's fault injection (:class:`RobotNode`'s hooks). On time, each tick is exactly
``env.step(policy(obs))``.

Faults (scenario file): added latency and jitter before publishing, dropped states, NaN or
garbage states, a pause. ``--video FILE.mp4`` records the closed-loop episodes (MuJoCo offscreen
rendering, which needs MUJOCO_GL=egl or osmesa); ``--record FILE.mcap`` writes the robot's side
of the run as an MCAP flight record, as qsm-serve writes the node's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mujoco
import numpy as np

from qsm_robot.envs import env_info, make_env
from qsm_robot.robot.client import Robot, RobotClient, RobotReport, require_key
from qsm_robot.robot.video import MAX_FPS, BackgroundRecorder, VideoError, VideoWriter, frame_stride
from qsm_robot.serve.auth import AuthError
from qsm_robot.serve.profile import Profile, ProfileError

__all__ = ["Faults", "RobotNode", "RobotReport", "Scenario", "SimRobot", "main", "physics_steps_per_tick"]

VIDEO_HEIGHT, VIDEO_WIDTH = 240, 320
"""Size of the recorded frames (within dm_control's default 640x480 offscreen buffer)."""
PERIOD_RTOL = 1e-9
"""Relative tolerance when checking that the profile's period is a whole number of control steps."""


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
    """How long that stall lasts."""


@dataclass
class Scenario:
    name: str
    seed: int = 0
    """Seeds the task (initial states) and, plus one, the fault draws."""
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


def physics_steps_per_tick(profile: Profile, control_step_s: float) -> int:
    """Task control steps per tick: the profile's period over the task's control step.

    A 50 Hz profile on a 100 Hz task holds each command for 2 steps, as action_repeat=2 did in
    training. The period must be a whole number of control steps (1e-9 relative tolerance), else
    ProfileError names both: never rounded. One exception: a profile with ``check_control_period:
    false`` whose period is shorter than one control step (the 500 and 1000 Hz timing profiles)
    steps once per tick: cartpole then runs one 10 ms control step per 1-2 ms tick, faster than
    real time, which is all a timing benchmark needs.
    """
    ratio = profile.period_s / control_step_s
    if ratio < 1 and not profile.check_control_period:
        return 1
    steps = max(1, round(ratio))
    if abs(ratio - steps) > PERIOD_RTOL * ratio:
        raise ProfileError(
            f"profile {profile.name!r}: the control period {profile.period_s * 1e3:g} ms ({profile.rate_hz:g} Hz) is not "
            f"a whole multiple of the task's control step {control_step_s * 1e3:g} ms ({profile.task}, ratio {ratio:.6g}); "
            f"use {1 / control_step_s:g} Hz divided by a whole number (or, for a timing benchmark above "
            f"{1 / control_step_s:g} Hz, set check_control_period false: the physics then runs faster than real time)")
    return steps


def no_video_hint(reason: str) -> str:
    """The one line printed when frames cannot be rendered."""
    return (f"no video: MuJoCo cannot render here ({reason}); run with MUJOCO_GL=egl (GPU or Mesa EGL) or "
            "MUJOCO_GL=osmesa (software: apt-get install libosmesa6) to record one")


class SimRobot(Robot):
    """A dm_control task as the robot: ``observe()`` is the task's observation, ``apply()`` steps
    its physics for one tick. With a video, every ``stride``-th tick hands a snapshot of the
    physics state to a :class:`BackgroundRecorder`, which renders it on its own thread (from a
    copy of the physics), so the control loop never waits for the renderer."""

    def __init__(self, profile: Profile, scenario: Scenario, video: Path | None = None,
                 log: Callable[[str], None] = print, video_fps: float = MAX_FPS):
        self.log = log
        base_period = env_info(make_env(profile.task)).control_period_s
        self.action_repeat = physics_steps_per_tick(profile, base_period)
        """Task control steps per tick."""
        self.env = make_env(profile.task, seed=scenario.seed, action_repeat=self.action_repeat, rescale_actions=False)
        self.episode_steps = scenario.episode_steps or profile.robot.episode_steps
        """Ticks per episode; None: the task's own time limit."""
        self.obs = self.env.reset()[0]
        self.ep_return, self.ep_steps, self.done = 0.0, 0, False
        self.ticks = 0
        """Ticks applied so far (all episodes)."""
        self.stride = frame_stride(profile.rate_hz, video_fps)
        """Ticks per video frame."""
        self.recorder: BackgroundRecorder | None = None
        if video is not None:
            self._start_video(Path(video), profile.rate_hz / self.stride)

    @property
    def physics(self):
        """The dm_control Physics behind the gymnasium env."""
        return self.env.unwrapped._env.physics

    def _snapshot(self) -> np.ndarray:
        return self.physics.get_state(sig=mujoco.mjtState.mjSTATE_FULLPHYSICS)

    def _start_video(self, path: Path, fps: float) -> None:
        backend = os.environ.get("MUJOCO_GL", "")
        if backend in ("", "disable"):  # qsm_robot.envs turns an unset MUJOCO_GL into 'disable'
            self.log(no_video_hint("MUJOCO_GL is unset or 'disable'"))
            return
        writer = VideoWriter(path, fps)  # VideoError (e.g. no imageio-ffmpeg) stops qsm-sim before it runs
        physics = self.physics.copy(share_model=True)  # the renderer's own: the loop keeps stepping its physics

        def render(state: np.ndarray) -> np.ndarray:
            physics.set_state(state, sig=mujoco.mjtState.mjSTATE_FULLPHYSICS)
            physics.forward()
            return physics.render(VIDEO_HEIGHT, VIDEO_WIDTH, camera_id=0)

        def release() -> None:  # on the render thread, which made the GL context (EGL frees it only there)
            with physics._contexts_lock:
                if physics._contexts:
                    physics._free_rendering_contexts()

        recorder = BackgroundRecorder(writer, render, self.log, release=release)
        try:
            recorder.start(self._snapshot())
        except VideoError as exc:
            self.log(f"no video: {exc}")
        except Exception as exc:  # the renderer: no GL backend, or a broken one
            text = str(exc).splitlines()[0] if str(exc) else ""
            self.log(no_video_hint(f"MUJOCO_GL={backend}: {type(exc).__name__}: {text}"))
        else:
            self.recorder = recorder

    def observe(self) -> np.ndarray:
        return self.obs

    def apply(self, command: np.ndarray) -> None:
        self.obs, reward, terminated, truncated, _ = self.env.step(command)
        self.ep_return += float(reward)
        self.ep_steps += 1
        self.done = terminated or truncated or (self.episode_steps is not None and self.ep_steps >= self.episode_steps)
        self.ticks += 1
        if self.recorder is not None and self.ticks % self.stride == 0:
            self.recorder.offer(self.ticks // self.stride, self._snapshot())

    def episode_done(self) -> bool:
        return self.done

    def reset(self) -> float:
        ret = self.ep_return
        self.obs, self.ep_return, self.ep_steps, self.done = self.env.reset()[0], 0.0, 0, False
        return ret

    def finish_video(self, complete: bool) -> None:
        """Complete the video (rename it into place) or, when ``complete`` is False, discard it."""
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return
        try:
            path = recorder.finish(complete)
        except VideoError as exc:
            self.log(str(exc))
            return
        if path is not None:
            repeated = f", {recorder.repeated} repeated where the renderer fell behind" if recorder.repeated else ""
            self.log(f"video: {path} ({recorder.writer.frames} frames at {recorder.writer.fps:g} fps{repeated})")

    def close(self) -> None:
        self.finish_video(complete=False)


class RobotNode(RobotClient):
    """qsm-sim: the robot client driving :class:`SimRobot`, with the scenario's faults injected
    at the client's hook points (before each tick: the pause; when publishing: latency, jitter,
    drops, NaN and garbage)."""

    def __init__(self, profile: Profile, scenario: Scenario, log=None, key: str | None = None,
                 video: str | Path | None = None, video_fps: float = MAX_FPS, record_ticks: int | None = None):
        """key: this robot's CURVE key pair (.key_secret), needed when the profile has CURVE keys.
        video: record the episodes to this .mp4 (needs MuJoCo rendering; without it, one line says so),
        at most ``video_fps`` frames per second (software rendering costs ~20 ms of CPU a frame).
        record_ticks: keep a flight record of the last this many ticks (``save_record`` writes it)."""
        require_key(profile, key)  # before building the physics
        log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        try:
            self.sim = SimRobot(profile, scenario, None if video is None else Path(video),
                                log=lambda m: log(f"qsm-sim: {m}"), video_fps=video_fps)
        except VideoError as exc:
            raise ProfileError(str(exc)) from None
        try:
            super().__init__(profile, self.sim, key=key, log=log, name="qsm-sim", record_ticks=record_ticks)
        except BaseException:
            self.sim.close()  # no partial video file, no GL context left behind
            raise
        self.scenario = scenario
        self.rng = np.random.default_rng(scenario.seed + 1)
        self._first_tick_ns: int | None = None
        self._paused = False

    @property
    def env(self):
        return self.sim.env

    @property
    def action_repeat(self) -> int:
        return self.sim.action_repeat

    def before_tick(self) -> bool:
        faults, now = self.scenario.faults, time.monotonic_ns()
        if self._first_tick_ns is None:
            self._first_tick_ns = now
        if self._paused or faults.pause_at_s is None or now - self._first_tick_ns < faults.pause_at_s * 1e9:
            return False
        self.log(f"fault: pausing {faults.pause_s} s")
        time.sleep(faults.pause_s)
        self._paused = True
        return True

    def send_state(self, obs: np.ndarray, seq: int, flags: int) -> int | None:
        faults = self.scenario.faults
        if faults.latency_ms or faults.jitter_ms:
            time.sleep(max(0.0, faults.latency_ms + self.rng.uniform(-1, 1) * faults.jitter_ms) / 1e3)
        draw = self.rng.random(3)
        if draw[0] < faults.drop_prob:
            return None
        if draw[1] < faults.garbage_prob:
            self.state_sock.send(self.rng.bytes(int(self.rng.integers(0, 200))))
            return None
        return super().send_state(np.full_like(obs, np.nan) if draw[2] < faults.nan_prob else obs, seq, flags)

    def run(self, connect_wait_s: float = 0.5) -> RobotReport:
        """The scenario's episodes (or until request_stop()); the video is completed at a normal
        end and discarded if the run fails."""
        try:
            report = super().run(episodes=self.scenario.episodes, connect_wait_s=connect_wait_s)
        except BaseException:
            self.sim.finish_video(complete=False)
            raise
        self.sim.finish_video(complete=True)
        return report

    def close(self) -> None:
        super().close()
        self.sim.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="qsm-sim", description="Simulated robot node for qsm-serve (MuJoCo, dm_control).")
    p.add_argument("--profile", required=True, help="deployment profile JSON (deploy/profiles/)")
    p.add_argument("--scenario", required=True, help="scenario JSON (sim/scenarios/)")
    p.add_argument("--episodes", type=int, help="override the scenario's episode count")
    p.add_argument("--results", type=Path, help="write the robot's report as JSON here")
    p.add_argument("--key", help="this robot's CURVE key pair (.key_secret) when the profile has CURVE keys")
    p.add_argument("--video", type=Path, metavar="FILE.mp4",
                   help="record the episodes (MuJoCo offscreen rendering: needs MUJOCO_GL=egl or osmesa)")
    p.add_argument("--video-fps", type=float, default=MAX_FPS,
                   help=f"at most this many video frames per second (default {MAX_FPS:g}; each costs ~20 ms of CPU "
                        "with software rendering)")
    p.add_argument("--record", type=Path, metavar="FILE.mcap",
                   help="write the robot's flight record (MCAP: states, commands, latencies, flags; the last "
                        "flight_record_ticks ticks of the profile) here at the end")
    a = p.parse_args(argv)
    if not a.video_fps > 0:
        p.error(f"--video-fps must be > 0, got {a.video_fps}")
    try:
        profile, scenario = Profile.load(a.profile), Scenario.load(a.scenario)
        if a.episodes:
            scenario.episodes = a.episodes
        node = RobotNode(profile, scenario, key=a.key, video=a.video, video_fps=a.video_fps,
                         record_ticks=profile.flight_record_ticks if a.record else None)
    except (ProfileError, AuthError) as exc:
        print(f"qsm-sim: error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, node.request_stop)
    signal.signal(signal.SIGTERM, node.request_stop)
    try:
        report = node.run()
        if a.record:
            print(f"qsm-sim: flight record {node.save_record(a.record, scenario=scenario.name)} "
                  f"(MCAP, last {len(node.recorder.data)} ticks)", file=sys.stderr)
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
