"""The reference robot client (qsm_robot.robot.client): its command rules without sockets or clocks
(CommandGate), its per-tick command-change limit against a fake node over ipc, its imports, and
the simulated robot's physics timing (qsm_robot.robot.node.physics_steps_per_tick)."""

import subprocess
import sys
import threading

import numpy as np
import pytest
import zmq
from conftest import profile_data

from qsm_robot.robot.client import CommandGate, Robot, RobotClient, RobotError, RobotReport
from qsm_robot.serve import protocol as P
from qsm_robot.serve.profile import Profile, ProfileError

WATCHDOG = 5


def make_profile(tmp_path=None, **overrides) -> Profile:
    data = profile_data("client", require_calibration=False, robot={"watchdog_periods": WATCHDOG}, **overrides)
    if tmp_path is not None:
        data["endpoints"] = {k: f"ipc://{tmp_path}/{k}.sock" for k in ("state", "command", "control")}
    return Profile.from_dict(data)


def command(ref: int, value, flags: int = 0) -> P.Message:
    return P.decode(P.encode(P.MsgType.COMMAND, ref, np.atleast_1d(np.float32(value)), ref=ref, flags=flags))


def gate(**overrides) -> tuple[CommandGate, RobotReport, list[str]]:
    report, logs = RobotReport(), []
    return CommandGate(make_profile(**overrides), report, logs.append), report, logs


def tick(g: CommandGate, seq: int, *messages: P.Message) -> float:
    """One tick: state ``seq`` sent, ``messages`` received, the applied command's value."""
    g.state_sent(seq, 1000 * seq)
    for m in messages:
        g.offer(m, 1000 * seq + 10)
    return float(g.decide(1000 * seq + 900)[0])


# --- the rules ---------------------------------------------------------------------------------
def test_the_fresh_command_else_one_tick_late_else_held_else_the_safe_command():
    g, report, logs = gate(max_delta_per_tick=None)
    assert tick(g, 1, command(1, 0.5)) == 0.5                        # fresh
    assert tick(g, 2) == 0.5                                          # late: held
    assert tick(g, 3, command(2, 0.75)) == 0.75                       # the answer to state 2, one tick late
    assert tick(g, 4, command(2, 0.875), command(4, 0.25)) == 0.25    # an answer to a superseded state is ignored
    assert report.commands_applied == 3 and report.commands_one_tick_late == 1 and report.commands_late == 1
    for seq in range(5, 5 + WATCHDOG - 2):                            # held until the last cutoff inside the watchdog
        assert tick(g, seq) == 0.25
    assert report.watchdog_trips == 0
    assert tick(g, 5 + WATCHDOG - 2) == 0.0                           # safe command, WATCHDOG - 1 periods after the last fresh one
    assert report.watchdog_trips == 1 and report.watchdog_periods_to_safe == [WATCHDOG - 1]
    assert tick(g, 20, command(20, -0.5)) == -0.5 and len(report.watchdog_clear_t_ns) == 1
    assert any("watchdog: no fresh command" in m for m in logs) and any("commands are back" in m for m in logs)


def test_bad_commands_are_rejected_and_foreign_ones_ignored():
    g, report, _ = gate(max_delta_per_tick=None)
    wrong_size = P.decode(P.encode(P.MsgType.COMMAND, 1, np.zeros(2, np.float32), ref=1))
    assert tick(g, 1, command(1, np.nan), command(1, 1.5), wrong_size) == 0.0
    assert report.commands_rejected == 3 and report.commands_applied == 0
    assert tick(g, 2, command(7, 0.5)) == 0.0  # ref above the last state sent: answers no state of ours
    assert report.commands_rejected == 3 and report.commands_applied == 0


def test_a_command_changing_more_than_max_delta_per_tick_is_clamped_and_counted():
    g, report, _ = gate(max_delta_per_tick=[0.1])
    assert tick(g, 1, command(1, 1.0)) == pytest.approx(0.1)
    assert tick(g, 2, command(2, 1.0)) == pytest.approx(0.2)
    assert report.commands_rate_clamped == 2
    assert tick(g, 3, command(3, np.float32(0.2) + np.float32(0.1))) == pytest.approx(0.3)  # within the limit (float32)
    assert tick(g, 4, command(4, -1.0)) == pytest.approx(0.2)  # clamped from the last applied command, either way
    assert report.commands_rate_clamped == 3


def test_the_safe_command_is_exempt_from_the_change_limit():
    g, report, _ = gate(max_delta_per_tick=[0.1])
    for seq in range(1, 9):
        tick(g, seq, command(seq, 1.0))
    assert tick(g, 9, command(9, 1.0)) == pytest.approx(0.9)
    clamped = report.commands_rate_clamped
    assert tick(g, 10, command(10, 0.0, flags=int(P.CommandFlag.SAFE))) == 0.0  # the node's safe command: at once
    assert report.commands_rate_clamped == clamped and report.safe_commands_from_node == 1
    for seq in range(11, 15):
        tick(g, seq, command(seq, 0.1 * (seq - 10)))
    for seq in range(15, 15 + WATCHDOG):  # the node goes silent: the watchdog's safe command, at once
        value = tick(g, seq)
    assert value == 0.0 and report.watchdog_trips == 1 and report.commands_rate_clamped == clamped


# --- the client against a fake node ---------------------------------------------------------------
class FakeRobot(Robot):
    """Records what it is told to apply; an episode is ``steps`` ticks."""

    def __init__(self, obs_dim: int, steps: int):
        self.obs, self.steps, self.applied = np.zeros(obs_dim, np.float32), steps, []

    def observe(self) -> np.ndarray:
        return self.obs

    def apply(self, command: np.ndarray) -> None:
        self.applied.append(float(command[0]))

    def episode_done(self) -> bool:
        return len(self.applied) % self.steps == 0


class FakeNode:
    """A plain PUB/SUB pair bound where qsm-serve would be; answers every state with ``value``."""

    def __init__(self, profile: Profile, value: float):
        ctx = zmq.Context.instance()
        self.states, self.commands = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB)
        self.states.setsockopt(zmq.SUBSCRIBE, b"")
        for sock in (self.states, self.commands):
            sock.setsockopt(zmq.LINGER, 0)
        self.states.bind(profile.endpoints.state)
        self.commands.bind(profile.endpoints.command)
        self.value, self.answered, self._stop = value, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            if not self.states.poll(20):
                continue
            state = P.decode(self.states.recv())
            self.commands.send(P.encode(P.MsgType.COMMAND, state.seq, np.array([self.value], np.float32), ref=state.seq))
            self.answered += 1

    def close(self) -> None:
        self._stop = True
        self.thread.join()
        self.states.close(0)
        self.commands.close(0)


def test_the_client_limits_each_ticks_command_change_against_a_node_that_jumps(tmp_path):
    profile = make_profile(tmp_path, rate_hz=50, max_delta_per_tick=[0.1])
    node = FakeNode(profile, value=1.0)
    robot = FakeRobot(profile.obs_dim, steps=30)
    client = RobotClient(profile, robot, log=lambda m: None)
    try:
        report = client.run(episodes=1, connect_wait_s=0.3)
    finally:
        client.close()
        node.close()
    applied = np.array([0.0] + robot.applied)
    assert report.steps == 30 and report.states_sent == 30 and node.answered > 0
    assert report.episodes and np.isnan(report.episodes[0])  # a robot that keeps no return
    # Every tick moved at most 0.1 from the last applied command (the safe command excepted).
    moves = np.abs(np.diff(applied))[applied[1:] != 0.0]
    assert (moves <= 0.1 + 1e-6).all(), applied
    assert report.commands_rate_clamped >= 9 and applied[-1] == pytest.approx(1.0), (report, applied)


def test_an_observation_that_does_not_fit_the_profile_is_a_clear_error(tmp_path):
    robot = FakeRobot(3, steps=10)
    client = RobotClient(make_profile(tmp_path), robot)
    try:
        with pytest.raises(RobotError, match=r"float32 of shape \(5,\).*got float32 \(3,\)"):
            client.observe()
    finally:
        client.close()


def test_client_imports_no_training_stack_nor_mujoco():
    code = ("import sys, qsm_robot.robot.client; "
            "bad = [m for m in ('torch', 'mujoco', 'dm_control', 'gymnasium') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- physics timing of the simulated robot ------------------------------------------------------
@pytest.mark.parametrize("rate_hz,check,steps", [(100, True, 1), (50, True, 2), (25, True, 4), (500, False, 1),
                                                  (1000, False, 1), (20, False, 5)])
def test_physics_steps_per_tick_is_the_period_over_the_control_step(rate_hz, check, steps):
    from qsm_robot.robot.node import physics_steps_per_tick

    profile = make_profile(rate_hz=rate_hz, check_control_period=check, latency_budget_ms=0.5)
    assert physics_steps_per_tick(profile, 0.01) == steps


@pytest.mark.parametrize("rate_hz,check", [(75, True), (40, True), (500, True), (40, False), (30, False)])
def test_a_period_that_is_not_a_whole_number_of_control_steps_is_refused(rate_hz, check):
    """Never rounded: not even with the period check off (only a period below one step is allowed then)."""
    from qsm_robot.robot.node import RobotNode, Scenario

    profile = make_profile(rate_hz=rate_hz, latency_budget_ms=0.5, check_control_period=check)
    with pytest.raises(ProfileError, match=rf"control period {1e3 / rate_hz:g} ms .* control step 10 ms"):
        RobotNode(profile, Scenario(name="t"))
