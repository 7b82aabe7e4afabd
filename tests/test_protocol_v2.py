"""Protocol version 2 (docs/PROTOCOL.md): one test per finding of the robot written from the
version-1 document: 64-bit references, version-1 peers refused and counted, restarts that publish
at once, every state accounted for (the state right after the first ARM included), an on-time
state after a late one answered, and the document's sizes."""

import re
import threading
import time

import numpy as np
import pytest
from conftest import REPO, profile_data

from qsm_robot.robot.client import CommandGate, Robot, RobotClient, RobotReport
from qsm_robot.serve import protocol as P
from qsm_robot.serve.client import ControlClient
from qsm_robot.serve.core import FloodGuard, NodeCore
from qsm_robot.serve.node import ServeNode
from qsm_robot.serve.policy_runner import PolicyRunner
from qsm_robot.serve.profile import Profile
from qsm_robot.serve.status import SCALARS

PERIOD_NS = 10_000_000  # 100 Hz: wide enough for these tests not to depend on the machine's load


def make_profile(tmp_path, **overrides) -> Profile:
    return Profile.from_dict(profile_data(
        "v2", rate_hz=100, latency_budget_ms=5.0, require_calibration=False, max_delta_per_tick=[2.0],
        endpoints={k: f"ipc://{tmp_path}/{k}.sock" for k in ("state", "command", "control")}, **overrides))


@pytest.fixture
def core(tmp_path, tiny_model):
    c = NodeCore(make_profile(tmp_path), PolicyRunner(tiny_model, seed=0))
    yield c
    c.runner.close()


def state(seq, flags=0, t_ns=None):
    return P.encode(P.MsgType.STATE, seq, np.zeros(5, np.float32), flags=flags, t_ns=t_ns)


# --- the wire ------------------------------------------------------------------------------------
def test_a_seq_past_2_to_the_32_is_answered_with_its_full_ref(core):
    """Version 1 sent ref = seq mod 2^32: after 2^32 states no command matched."""
    seq = 2**32 + 5
    assert core.arm("test")
    reply = P.decode(core.answer(state(seq), time.monotonic_ns()))
    assert reply.type == P.MsgType.COMMAND and reply.ref == seq
    report = RobotReport()
    gate = CommandGate(core.profile, report, lambda m: None)
    gate.state_sent(seq, 0)
    assert gate.offer(reply, 10)  # the robot's rule (ref == the state just sent) matches
    assert report.commands_rejected == 0


def test_a_version_1_frame_is_refused_with_both_versions_named_and_counted(core):
    v1 = P.MAGIC + bytes([1, int(P.MsgType.STATE), 0, 0]) + bytes(24) + np.zeros(5, "<f4").tobytes()
    with pytest.raises(P.VersionError, match="protocol version 1, this side speaks version 2"):
        P.decode(v1)
    assert core.admit(v1, time.monotonic_ns()) is None
    assert core.control(P.MAGIC + bytes([1, int(P.MsgType.ARM)]) + bytes(26)) is None
    assert core.counters.wrong_version == 2 and core.counters.malformed == 0
    assert core.status().wrong_version == 2


def test_the_reserved_word_must_be_zero():
    frame = bytearray(P.encode(P.MsgType.HEARTBEAT, 1))
    frame[36] = 1
    with pytest.raises(P.ProtocolError, match="reserved"):
        P.decode(bytes(frame))


def test_the_documents_frame_sizes_are_the_encoders():
    """docs/PROTOCOL.md's sizes for cartpole (obs 5, act 1) against what encode() writes."""
    text = (REPO / "docs" / "PROTOCOL.md").read_text()
    sizes = {
        "STATE": len(P.encode(P.MsgType.STATE, 1, np.zeros(5))),
        "COMMAND": len(P.encode(P.MsgType.COMMAND, 1, np.zeros(1))),
        "control": len(P.encode(P.MsgType.ARM, 1)),
        "STATUS": P.HEADER_SIZE + 8 * (len(SCALARS) + 1 + 2 * 5),
    }
    match = re.search(r"Sizes: a STATE is `40 \+ 4·obs_dim` bytes \((\d+) for cartpole\), a COMMAND "
                      r"`40 \+ 4·act_dim` \((\d+)\),\na control message (\d+) .*?\(\s*(\d+) for cartpole\)", text, re.S)
    assert match, "the Sizes paragraph of docs/PROTOCOL.md changed shape"
    assert [int(g) for g in match.groups()] == [sizes["STATE"], sizes["COMMAND"], sizes["control"], sizes["STATUS"]]
    assert f"{len(SCALARS)} + act_dim + 2·obs_dim float64" in text


# --- admission: restarts, accounting, the flood guard ---------------------------------------------
def test_a_restart_flag_repeated_until_answered_starts_a_new_stream_without_a_safe_stop(core):
    assert core.arm("test")
    now = time.monotonic_ns()
    for seq in range(2, 41):  # the first robot: its seq 1 (flagged) was lost, seq 2 is the first read
        core.answer(state(seq, P.StateFlag.RESTART if seq <= 2 else 0), time.monotonic_ns())
    assert core.state == P.NodeState.RUNNING and core.counters.restarts == 1
    # It restarts: its first two states are lost to the new connection, the third is read.
    assert core.answer(state(3, P.StateFlag.RESTART), time.monotonic_ns()) is not None  # below seq 40, yet taken
    assert core.answer(state(4, P.StateFlag.RESTART), time.monotonic_ns()) is not None  # flagged, continuing the new stream
    assert core.answer(state(5), time.monotonic_ns()) is not None
    c = core.counters
    assert (c.restarts, c.resyncs, c.replayed, c.safe_stops) == (2, 0, 0, 0) and core.state == P.NodeState.RUNNING
    assert c.seq_gaps == 1 + 2  # seq 1 of the first run, seqs 1-2 of the second
    # A flagged state below the flagged stream's last seq: the robot restarted again.
    assert core.answer(state(1, P.StateFlag.RESTART), time.monotonic_ns()) is not None and c.restarts == 3


def test_every_state_is_accounted_for(core):
    """seqs sent = ticks + superseded + seq_gaps + replayed + clock_jumps (+ one pending)."""
    now = time.monotonic_ns()
    sent = 0
    core.hold(core.admit(state(1, P.StateFlag.RESTART), time.monotonic_ns()))
    sent += 1
    for seq in range(2, 30):
        sent += 1
        if seq % 7 == 0:
            continue  # lost in the conflating queue
        frame = state(seq, t_ns=now + 10**15) if seq == 20 else state(seq)  # 20: a clock jump
        core.hold(core.admit(frame, time.monotonic_ns()))
        if seq % 3:  # the flood guard lets every third state wait, and the next supersedes it
            admitted = core.take_due(now + seq * PERIOD_NS)
            if admitted is not None:
                core.record(core.act(admitted), time.monotonic_ns())
    core.hold(core.admit(state(12), time.monotonic_ns()))  # a replay
    sent += 1
    c = core.counters
    pending = int(core.pending is not None)
    assert c.superseded > 0 and c.seq_gaps == 4 and c.replayed == 1 and c.clock_jumps == 1
    assert sent == c.ticks + c.superseded + c.seq_gaps + c.replayed + c.clock_jumps + pending


def test_flood_guard_answers_an_on_time_state_after_a_late_one_and_caps_a_flood():
    guard = FloodGuard(PERIOD_NS)
    t = 0
    assert guard.take(t)                                   # on time
    t += PERIOD_NS + 9 * PERIOD_NS // 10                   # the next is 0.9 periods late ...
    assert guard.take(t)
    t += PERIOD_NS // 10                                   # ... and the one after it on time, 0.1 periods later
    assert guard.take(t), "an on-time state right after a late one must be answered at once"
    flood = [guard.take(t + k * PERIOD_NS // 100) for k in range(1, 1001)]  # 100 states a period for 10 periods
    assert 18 <= sum(flood) <= 22  # at most 2 a period on average (plus what the bucket held)
    assert guard.ready_at(t + 1000 * PERIOD_NS // 100) > t + 1000 * PERIOD_NS // 100  # the flood emptied it


def test_core_due_at_and_take_due_follow_the_flood_guard(core):
    now = time.monotonic_ns()
    assert core.due_at(now) is None
    for seq in (1, 2, 3):
        core.hold(core.admit(state(seq), time.monotonic_ns()))
        assert core.due_at(now) is not None
        if seq < 3:
            assert core.take_due(now) is not None  # two back to back
    assert core.take_due(now) is None and core.due_at(now) == now + PERIOD_NS // 2  # the third waits half a period
    assert core.take_due(now + PERIOD_NS // 2).msg.seq == 3


# --- a real node and the reference robot client over ipc ------------------------------------------
class CountingRobot(Robot):
    def __init__(self, steps: int):
        self.steps, self.t, self.commands = steps, 0, []

    def observe(self) -> np.ndarray:
        return np.zeros(5, np.float32)

    def apply(self, command: np.ndarray) -> None:
        self.commands.append(float(command[0]))
        self.t += 1

    def episode_done(self) -> bool:
        return self.t >= self.steps


def run_robot(profile: Profile, steps: int) -> RobotReport:
    client = RobotClient(profile, CountingRobot(steps), log=lambda m: None)
    try:
        return client.run(episodes=1, connect_wait_s=0.0)  # publishes its first state at once
    finally:
        client.close()


def reconcile(c, sent: int) -> None:
    assert sent == c.ticks + c.superseded + c.seq_gaps + c.replayed + c.clock_jumps, vars(c)


def test_robots_that_restart_and_publish_at_once_are_answered_without_an_arm(tmp_path, tiny_model):
    profile = make_profile(tmp_path)
    node = ServeNode(tiny_model, profile)
    node.core.arm("test")
    thread = threading.Thread(target=node.run, kwargs={"duration_s": 30.0})
    thread.start()
    try:
        first = run_robot(profile, 60)
        second = run_robot(profile, 60)  # a restart: seqs from 1 again, below the first run's
    finally:
        node.request_stop()
        thread.join()
        node.close()
    c = node.core.counters
    for report in (first, second):
        assert report.commands_applied >= 30, vars(report)   # answered, with no ARM in between
        assert 1 <= report.restart_flagged < 30               # the flag went off once a state was answered
    assert c.restarts == 2 and c.resyncs == 0 and c.safe_stops == 0 and node.core.state == P.NodeState.RUNNING
    reconcile(c, first.states_sent + second.states_sent)


def test_the_states_around_the_first_arm_of_a_fresh_node_are_all_accounted_for(tmp_path, tiny_model):
    profile = make_profile(tmp_path)
    node = ServeNode(tiny_model, profile)
    thread = threading.Thread(target=node.run, kwargs={"duration_s": 30.0})
    thread.start()
    robot = CountingRobot(150)
    client = RobotClient(profile, robot, log=lambda m: None)
    control = ControlClient(profile.endpoints.control, timeout_s=5.0)
    arm = threading.Timer(0.5, lambda: control.send(P.MsgType.ARM))
    try:
        arm.start()
        report = client.run(episodes=1, connect_wait_s=0.0)
        arm.join()
    finally:
        client.close()
        control.close()
        node.request_stop()
        thread.join()
        node.close()
    c = node.core.counters
    assert node.core.state == P.NodeState.RUNNING and report.safe_commands_from_node > 0
    assert any(v != 0.0 for v in robot.commands), "after the ARM the policy's commands reach the robot"
    reconcile(c, report.states_sent)


def test_a_forged_stream_interleaved_with_the_robots_costs_a_safe_stop_within_the_bound(core):
    """Forged seqs 2^63 + k, one per robot state: the forgeries are taken, the robot's states
    rejected; the node re-syncs and safe-stops within resync_after_rejected + 2 robot states
    (version 1 counted rejections in a row, which each taken forgery reset: no bound at all)."""
    assert core.arm("test")
    now = time.monotonic_ns()
    for seq in range(1, 11):
        core.answer(state(seq), time.monotonic_ns())
    n = core.profile.resync_threshold
    robot_states = 0
    for k in range(1, 4 * n):
        core.answer(state(2**63 + k), time.monotonic_ns())
        robot_states += 1
        core.answer(state(10 + k), time.monotonic_ns())
        if core.state == P.NodeState.SAFE_STOP:
            break
    assert core.state == P.NodeState.SAFE_STOP and core.counters.resyncs == 1
    assert robot_states <= n + 2


def test_the_protocol_campaign_cases_pass_on_a_small_model(tiny_model):
    from campaigns import protocol

    rows = protocol.run(tiny_model, rate_hz=100, trials=1, steps=120, log=lambda m: None)
    failed = {r["case"]: r["problems"] for r in rows if not r["passed"]}
    assert len(rows) == len(protocol.CASES) and not failed
