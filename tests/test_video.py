"""Video of the robot: the MP4 encoder on synthetic frames (no OpenGL needed), the background
recorder, and qsm-sim --video where MuJoCo cannot render (one line, and the robot still runs)."""

import json
import os
import signal
import subprocess

from campaigns import harness
import imageio.v2 as imageio
import numpy as np
import pytest
from conftest import REPO, profile_data

from qsm_robot.robot.video import BackgroundRecorder, VideoError, VideoWriter, frame_stride, write_video

H, W = 48, 64


def frames(n: int) -> list[np.ndarray]:
    """n distinct frames: a bright square moving across a dark background."""
    out = []
    for i in range(n):
        f = np.full((H, W, 3), 20, np.uint8)
        f[8:24, 4 * i:4 * i + 16] = (250, 120, 40)
        out.append(f)
    return out


def read_back(path) -> list[np.ndarray]:
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return [frame for frame in reader]  # not list(reader): its length hint is infinite
    finally:
        reader.close()


def test_frames_become_an_mp4_with_that_many_frames_of_that_size(tmp_path):
    path = write_video(tmp_path / "out" / "run.mp4", frames(7), fps=25)
    got = read_back(path)
    assert len(got) == 7 and all(f.shape == (H, W, 3) for f in got)
    assert abs(got[3].astype(int) - frames(7)[3]).mean() < 10  # lossy, but the same picture
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.mp4"]  # no temporary file left


def test_a_failed_recording_leaves_no_file(tmp_path):
    with pytest.raises(VideoError, match=r"frame 2 has shape \(48, 32, 3\)"):
        write_video(tmp_path / "run.mp4", frames(2) + [np.zeros((H, 32, 3), np.uint8)], fps=25)
    with pytest.raises(VideoError, match="uint8"):
        write_video(tmp_path / "run.mp4", [np.zeros((H, W, 3), np.float32)], fps=25)
    with pytest.raises(VideoError, match="must end in .mp4"):
        VideoWriter(tmp_path / "run.avi", fps=25)
    assert list(tmp_path.iterdir()) == []


def test_frame_stride_keeps_the_video_at_50_fps_or_less():
    assert [frame_stride(r) for r in (25, 50, 100, 500, 1000, 60)] == [1, 1, 2, 10, 20, 2]


def test_background_recorder_fills_missed_slots_with_the_previous_frame(tmp_path):
    logs = []
    recorder = BackgroundRecorder(VideoWriter(tmp_path / "bg.mp4", fps=10), lambda i: frames(6)[i], logs.append)
    recorder.start(0)
    for index in (1, 2, 5):  # slots 3 and 4 were missed (dropped snapshots)
        recorder.offer(index, index)
    assert recorder.finish(complete=True) == tmp_path / "bg.mp4"
    assert len(read_back(tmp_path / "bg.mp4")) == 6 and recorder.repeated == 2 and not logs


def test_background_recorder_discards_the_video_when_rendering_fails(tmp_path):
    def render(i):
        if i == 3:
            raise RuntimeError("GL context lost")
        return frames(6)[i]

    logs = []
    recorder = BackgroundRecorder(VideoWriter(tmp_path / "bg.mp4", fps=10), render, logs.append)
    recorder.start(0)
    for index in range(1, 6):
        recorder.offer(index, index)
    assert recorder.finish(complete=True) is None
    assert list(tmp_path.iterdir()) == [] and len(logs) == 1 and "GL context lost" in logs[0]


def test_a_first_frame_that_cannot_be_rendered_is_raised_and_leaves_no_file(tmp_path):
    def render(_):
        raise RuntimeError("No OpenGL rendering backend is available.")

    recorder = BackgroundRecorder(VideoWriter(tmp_path / "bg.mp4", fps=10), render, print)
    with pytest.raises(RuntimeError, match="No OpenGL"):
        recorder.start(0)
    assert list(tmp_path.iterdir()) == []


def test_without_gl_qsm_sim_says_so_in_one_line_and_the_robot_still_runs(tiny_model, tmp_path):
    endpoints = harness.ipc_endpoints(tmp_path)
    profile = harness.write_json(tmp_path / "profile.json", profile_data(
        "video", latency_budget_ms=5.0, require_calibration=False, max_delta_per_tick=None, endpoints=endpoints,
        robot={"watchdog_periods": 5, "episode_steps": 50}))
    scenario = harness.write_json(tmp_path / "scenario.json", {"name": "video", "seed": 0, "episodes": 1})
    serve = harness.start_serve(tiny_model, profile, tmp_path / "rec")
    try:
        harness.wait_ready(endpoints["control"], serve, timeout_s=30)
        sim = subprocess.run(harness.SIM + ["--profile", str(profile), "--scenario", str(scenario),
                                            "--results", str(tmp_path / "robot.json"), "--video", str(tmp_path / "v.mp4")],
                             cwd=REPO, env={**harness.child_env(), "MUJOCO_GL": "disable"},
                             capture_output=True, text=True, timeout=120)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=30)
    assert sim.returncode == 0, sim.stderr
    lines = [line for line in sim.stderr.splitlines() if "video" in line]
    assert len(lines) == 1 and "no video" in lines[0] and "MUJOCO_GL=egl" in lines[0] and "libosmesa6" in lines[0], lines
    robot = json.loads((tmp_path / "robot.json").read_text())
    assert robot["steps"] == 50 and robot["commands_applied"] > 25
    assert not any(name.endswith(".mp4") for name in os.listdir(tmp_path))


def test_the_render_thread_runs_at_the_lowest_priority_and_the_caller_keeps_its_own(tmp_path):
    """Rendering (~20 ms a frame in software) must never take CPU from the control loop."""
    import os
    import threading

    seen = []

    def render(i):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return frames(3)[i]

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    recorder = BackgroundRecorder(VideoWriter(tmp_path / "bg.mp4", fps=10), render, lambda m: None)
    recorder.start(0)
    recorder.offer(1, 1)
    assert recorder.finish(complete=True) == tmp_path / "bg.mp4"
    assert seen == [19, 19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
