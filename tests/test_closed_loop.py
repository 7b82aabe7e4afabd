"""The end-to-end proof: train -> export -> qsm-serve and qsm-sim as separate processes.

The closed-loop return must agree with an offline rollout of the same ONNX file on the same
env seed with the same noise stream: exactly when every command arrived in time (the robot node
applies each command to the state it answers, as env.step does), within 5% otherwise. This
checks the observation order, the action scaling and the timing path together.
"""

import json
import warnings
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from campaigns import harness
from conftest import REPO, profile_data

from qsm_robot.cli.export import main as export_main
from qsm_robot.cli.train import main as train_main
from qsm_robot.envs import make_env
from qsm_robot.export.runtime import make_session
from qsm_robot.serve import protocol as P
from qsm_robot.serve.flight_record import node_ticks, robot_ticks
from qsm_robot.serve.flight_record import read as read_record
from qsm_robot.serve.client import ControlClient

SERVE = [sys.executable, "-m", "qsm_robot.cli.serve"]
SIM = [sys.executable, "-m", "qsm_robot.robot.node"]
STEPS = 300


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    assert train_main(["--preset", "smoke", "--steps", "600", "--threads", "1", "--run-dir", str(tmp / "run")]) == 0
    out = tmp / "policy.onnx"
    assert export_main([str(tmp / "run"), "--out", str(out), "--min-retention", "0", "--distill-iterations", "200",
                        "--student-hidden", "32", "--state-episodes", "1", "--start-episodes", "0", "--eval-episodes", "1",
                        "--latency-calls", "100", "--threads", "1"]) == 0
    return out


def write_files(tmp_path, episodes=1):
    profile = profile_data(
        "e2e", rate_hz=100, latency_budget_ms=5.0, max_delta_per_tick=None, require_calibration=False,
        endpoints={k: f"ipc://{tmp_path}/{k}.sock" for k in ("state", "command", "control")},
        robot={"watchdog_periods": 5, "episode_steps": STEPS},
    )
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    (tmp_path / "scenario.json").write_text(json.dumps({"name": "e2e", "seed": 3, "episodes": episodes}))
    return tmp_path / "profile.json", tmp_path / "scenario.json", profile["endpoints"]["control"]


def start_serve(model, profile_path, tmp_path):
    return harness.start_serve(model, profile_path, tmp_path / "rec")


def wait_ready(control, proc):
    return harness.wait_ready(control, proc, timeout_s=30)


def offline_return(model, seed=3, noise_seed=0, steps=STEPS):
    session = make_session(model)
    rng = np.random.default_rng(noise_seed)
    env = make_env("cartpole-swingup", seed=seed, rescale_actions=False)
    obs, total = env.reset()[0], 0.0
    for _ in range(steps):
        noise = rng.standard_normal((1, 5, 1), dtype=np.float32)
        action = session.run(None, {"obs": obs[None], "noise": noise})[0][0]
        obs, reward, *_ = env.step(action)
        total += reward
    return total


def check_both_sides_records(tmp_path):
    """One MCAP file per side shows the whole run: the robot's command for each of its states is
    the node's answer to it (when on time and unclamped), and both map the one monotonic clock to
    the same log time."""
    (node_path,) = (tmp_path / "rec").glob("flight-*.mcap")
    node, robot = read_record(node_path), read_record(tmp_path / "robot.mcap")
    robot_rows, node_rows = robot_ticks(robot), node_ticks(node)
    assert len(robot_rows) == STEPS and robot_rows["seq"].tolist() == list(range(1, STEPS + 1))
    answers = {int(r["state_seq"]): r["command"] for r in node_rows}
    fresh = [r for r in robot_rows if r["flags"] == 0 and r["ref"] == r["seq"]]
    assert fresh and all((r["command"] == answers[int(r["seq"])]).all() for r in fresh)
    node_states = {m["seq"]: m for m in node.channels["/states"]}
    gaps = [abs(m["log_time_ns"] - (m["t_ns"] + robot.metadata["monotonic_to_unix_ns"])) for m in robot.channels["/states"] if m["t_ns"]]
    assert max(gaps) == 0  # the robot's log time is its monotonic send time, mapped
    pairs = [(m, node_states[m["seq"]]) for m in robot.channels["/states"] if m["seq"] in node_states]
    assert pairs and all(abs(r["log_time_ns"] - (n["t_ns"] + node.metadata["monotonic_to_unix_ns"])) < 5_000_000
                         for r, n in pairs)  # both offsets map one clock (they differ by clock slew only)


def test_closed_loop_return_agrees_with_offline_evaluation(model, tmp_path):
    profile_path, scenario_path, control = write_files(tmp_path)
    serve = start_serve(model, profile_path, tmp_path)
    try:
        assert wait_ready(control, serve)["node_state"] == "ARMED"
        sim = subprocess.run(SIM + ["--profile", str(profile_path), "--scenario", str(scenario_path),
                                    "--results", str(tmp_path / "robot.json"), "--record", str(tmp_path / "robot.mcap")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert sim.returncode == 0, sim.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    robot = json.loads((tmp_path / "robot.json").read_text())
    assert len(robot["episodes"]) == 1 and robot["steps"] == STEPS
    check_both_sides_records(tmp_path)
    assert robot["commands_rejected"] == 0  # (a loaded machine may trip the watchdog: then the returns only agree)
    closed, offline = robot["episodes"][0], offline_return(model)
    assert "qsm-serve summary" in out
    (record,) = (tmp_path / "rec").glob("flight-*.mcap")
    ticks = node_ticks(record)
    fallbacks = int(((ticks["flags"] & int(P.TickFlag.FALLBACK)) > 0).sum())
    if robot["commands_late"] == 0 and robot["commands_one_tick_late"] == 0 and fallbacks == 0:
        assert closed == pytest.approx(offline, abs=1e-6)  # every command on time: the same episode
    else:  # one late command changes the trajectory (tests/test_demo.py says more); most must be on time
        off_time = robot["commands_late"] + robot["commands_one_tick_late"] + fallbacks
        assert off_time <= STEPS // 5, f"{off_time} of {STEPS} ticks without an on-time command"
        warnings.warn(f"a command was late (robot late {robot['commands_late']}, node fallbacks {fallbacks}): "
                      "closed-loop and offline returns not compared")


def test_kill_9_of_the_node_puts_the_robot_on_its_safe_command_within_the_watchdog(model, tmp_path):
    profile_path, scenario_path, control = write_files(tmp_path)
    serve = start_serve(model, profile_path, tmp_path)
    wait_ready(control, serve)
    sim = subprocess.Popen(SIM + ["--profile", str(profile_path), "--scenario", str(scenario_path),
                                  "--results", str(tmp_path / "robot.json")],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    os.kill(serve.pid, signal.SIGKILL)
    serve.communicate()
    _, err = sim.communicate(timeout=60)
    assert sim.returncode == 0, err
    robot = json.loads((tmp_path / "robot.json").read_text())
    assert robot["watchdog_trips"] == 1 and robot["watchdog_periods_to_safe"][0] <= 5
    assert robot["watchdog_ticks"] > 0 and "watchdog: no fresh command" in err


def test_injected_faults_are_survived_and_counted(model, tmp_path):
    profile_path, _, control = write_files(tmp_path)
    scenario = tmp_path / "faults.json"
    scenario.write_text(json.dumps({"name": "faults", "seed": 1, "episodes": 1, "faults": {
        "latency_ms": 0.5, "jitter_ms": 0.5, "drop_prob": 0.05, "nan_prob": 0.05, "garbage_prob": 0.05,
        "pause_at_s": 1.0, "pause_s": 0.3}}))
    serve = start_serve(model, profile_path, tmp_path)
    try:
        wait_ready(control, serve)
        sim = subprocess.run(SIM + ["--profile", str(profile_path), "--scenario", str(scenario),
                                    "--results", str(tmp_path / "robot.json")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert sim.returncode == 0, sim.stderr
        status = ControlClient(control, timeout_s=2.0).send(P.MsgType.HEARTBEAT)
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err  # the node survived everything and exited cleanly
    robot = json.loads((tmp_path / "robot.json").read_text())
    assert robot["steps"] == STEPS and robot["commands_rejected"] == 0
    assert status["state_invalid"] > 0 and status["malformed"] > 0  # NaN states and garbage were counted
    # The 0.3 s pause (30 periods) leaves the node without fresh states: it goes to safe-stop.
    assert status["node_state"] == "SAFE_STOP"
    assert "RUNNING -> SAFE_STOP: no fresh state for" in err
    (record,) = (tmp_path / "rec").glob("flight-*.mcap")
    commands = node_ticks(record)["command"][:, 0]
    assert np.isfinite(commands).all() and (np.abs(commands) <= 1).all()


@pytest.mark.parametrize("rate_hz,repeat,check", [(100, 1, True), (50, 2, False), (20, 5, False), (500, 1, False)])
def test_robot_steps_the_physics_for_the_profiles_period(tmp_path, rate_hz, repeat, check):
    """A period that is a whole number of the task's control steps is stepped as such; with the
    period check off (timing profiles), a faster rate steps one control step per tick."""
    from qsm_robot.envs import env_info
    from qsm_robot.robot.node import RobotNode, Scenario
    from qsm_robot.serve.profile import Profile

    profile_path, _, _ = write_files(tmp_path)
    data = json.loads(profile_path.read_text())
    profile = Profile.from_dict({**data, "rate_hz": rate_hz, "latency_budget_ms": 1.0, "check_control_period": check})
    node = RobotNode(profile, Scenario(name="t"))
    try:
        assert node.action_repeat == repeat and env_info(node.env).action_repeat == repeat
    finally:
        node.close()
