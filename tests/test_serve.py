"""qsm-serve: protocol, safety chain (property-based), node behaviour, and the no-torch rule."""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import make_contract

from qsm_robot.serve import protocol as P
from qsm_robot.serve.client import ControlClient
from qsm_robot.serve.node import ServeNode
from qsm_robot.serve.profile import Profile, ProfileError, check_contract
from qsm_robot.serve.safety import SafetyChain, SafetyConfig
from qsm_robot.serve.telemetry import MISS_BIT


def profile_dict(tmp_path, **overrides):
    base = {
        "name": "test", "task": "cartpole-swingup", "obs_dim": 5, "act_dim": 1, "action_low": [-1.0],
        "action_high": [1.0], "safe_command": [0.0], "rate_hz": 100, "latency_budget_ms": 2.0,
        "max_delta_per_tick": [0.3], "stale_periods": 3,
        "endpoints": {k: f"ipc://{tmp_path}/{k}.sock" for k in ("state", "command", "control")},
    }
    return {**base, **overrides}


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model


# --- protocol ----------------------------------------------------------------------------------
def test_message_round_trip():
    frame = P.encode(P.MsgType.COMMAND, 7, [1.5, -2.0], ref=3, flags=1, t_ns=123)
    msg = P.decode(frame)
    assert (msg.type, msg.seq, msg.ref, msg.flags, msg.t_ns) == (P.MsgType.COMMAND, 7, 3, 1, 123)
    assert msg.payload.tolist() == [1.5, -2.0] and len(frame) == 32 + 8


@pytest.mark.parametrize("frame,reason", [
    (b"short", "shorter than"),
    (b"XXXX" + P.encode(P.MsgType.STATE, 1, [0.0])[4:], "bad magic"),
    (P.encode(P.MsgType.STATE, 1, [0.0])[:4] + bytes([9]) + P.encode(P.MsgType.STATE, 1, [0.0])[5:], "protocol version 9"),
    (P.encode(P.MsgType.STATE, 1, [0.0])[:5] + bytes([99]) + P.encode(P.MsgType.STATE, 1, [0.0])[6:], "unknown message type"),
    (P.encode(P.MsgType.STATE, 1, [0.0, 1.0])[:-4], "does not match count"),
])
def test_malformed_frames_are_protocol_errors(frame, reason):
    with pytest.raises(P.ProtocolError, match=reason):
        P.decode(frame)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_decode_never_raises_anything_but_protocol_error(frame):
    try:
        P.decode(frame)
    except P.ProtocolError:
        pass


# --- safety chain ------------------------------------------------------------------------------
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([1e30, -1e30, np.nan, np.inf, -np.inf]))
vectors = st.one_of(st.lists(floats, min_size=0, max_size=4), st.lists(floats, min_size=2, max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(vectors, vectors), min_size=1, max_size=40), st.sampled_from(["hold", "safe"]), st.integers(0, 10))
def test_every_command_is_within_bounds_and_rate_limit(ticks, fallback, soft_start):
    low, high, delta = np.array([-1.0, 0.0], np.float32), np.array([2.0, 0.5], np.float32), np.array([0.25, 0.05], np.float32)
    chain = SafetyChain(SafetyConfig(obs_dim=2, act_dim=2, action_low=low, action_high=high, safe_command=np.array([0.0, 0.25], np.float32),
                                     max_delta=delta, fallback=fallback, soft_start_ticks=soft_start,
                                     soft_start_delta=np.array([0.01, 0.001], np.float32)))
    chain.arm()
    prev = chain.last.copy()
    for obs, action in ticks:
        usable, flags = chain.check_state(np.array(obs, dtype=np.float32))
        result = chain.filter_action(np.array(action, dtype=np.float32), flags) if usable else chain.fallback_command(flags)
        c = result.command
        assert c.shape == (2,) and np.isfinite(c).all()
        assert (c >= low).all() and (c <= high).all()
        assert (np.abs(c - prev) <= delta + 1e-6).all()
        prev = c


# --- profile -----------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ({"rate_hz": 2000}, "rate_hz: must be in [50, 1000]"),
    ({"latency_budget_ms": 20}, "latency_budget_ms: must be > 0 and below the period"),
    ({"safe_command": [5.0]}, "safe_command: must lie within the actuator bounds"),
    ({"action_low": [-1.0, 0.0]}, "action_low: must have act_dim=1 values"),
    ({"fallback": "panic"}, "fallback: must be 'hold' or 'safe'"),
    ({"typo_key": 1}, "unknown keys ['typo_key']"),
])
def test_invalid_profiles_name_the_field(tmp_path, override, message):
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Profile.from_dict(profile_dict(tmp_path, **override))


def test_shipped_profiles_load():
    from conftest import REPO

    paths = sorted((REPO / "deploy" / "profiles").glob("*.json"))
    assert len(paths) >= 3
    for path in paths:
        assert Profile.load(path).name == path.stem


def test_a_model_that_does_not_fit_the_profile_is_refused_with_every_mismatch(tmp_path):
    profile = Profile.from_dict(profile_dict(tmp_path))
    check_contract(profile, make_contract())
    bad = make_contract(obs_dim=6, action_high=[2.0], control_period_s=0.02)
    with pytest.raises(ProfileError) as info:
        check_contract(profile, bad)
    text = str(info.value)
    assert "obs_dim: model 6, profile 5" in text and "action_high" in text and "control period: model 20.000 ms" in text


# --- the node, driven tick by tick -------------------------------------------------------------
@pytest.fixture
def node(tmp_path, model_path):
    n = ServeNode(model_path, Profile.from_dict(profile_dict(tmp_path)), seed=0)
    yield n
    n.close()


def arm(node):
    assert node.arm("test")


def state_frame(seq, obs, t_ns=None):
    return P.encode(P.MsgType.STATE, seq, obs, t_ns=t_ns)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    st.lists(floats, min_size=0, max_size=8).map(lambda v: ("obs", v)),
    st.binary(max_size=64).map(lambda b: ("bytes", b)),
), min_size=1, max_size=25))
def test_node_commands_stay_safe_whatever_arrives(tmp_path_factory, model_path, inputs):
    tmp = tmp_path_factory.mktemp("prop")
    n = ServeNode(model_path, Profile.from_dict(profile_dict(tmp)), seed=0)
    try:
        arm(n)
        n._answer(state_frame(1, np.zeros(5)), time.monotonic_ns())
        for i, (kind, value) in enumerate(inputs, start=2):
            frame = state_frame(i, np.array(value, np.float32)) if kind == "obs" else value
            n._answer(frame, time.monotonic_ns())
        commands = n.recorder.data["command"][:, 0]
        assert np.isfinite(commands).all() and (np.abs(commands) <= 1.0).all()
        steps = np.abs(np.diff(np.concatenate([[0.0], commands])))
        assert (steps <= 0.3 + 1e-6).all()
    finally:
        n.close()


def test_replayed_and_out_of_order_states_are_ignored(node):
    arm(node)
    node._answer(state_frame(5, np.zeros(5)), time.monotonic_ns())
    node._answer(state_frame(5, np.zeros(5)), time.monotonic_ns())
    node._answer(state_frame(3, np.zeros(5)), time.monotonic_ns())
    assert node.counters.ticks == 1 and node.counters.replayed == 2


def test_a_forged_sequence_number_costs_a_resync_and_a_safe_stop_not_the_stream(node):
    arm(node)
    now = time.monotonic_ns()
    node._answer(state_frame(1, np.zeros(5), t_ns=now), now)
    node._answer(state_frame(2**63, np.zeros(5)), time.monotonic_ns())  # forged: every real seq is now "old"
    n = node.profile.max_consecutive_stale
    for seq in range(2, 2 + n):
        node._answer(state_frame(seq, np.zeros(5)), time.monotonic_ns())
    assert node.counters.replayed == n and node.state == P.NodeState.RUNNING
    node._answer(state_frame(2 + n, np.zeros(5)), time.monotonic_ns())
    assert node.counters.resyncs == 1 and node.state == P.NodeState.SAFE_STOP
    arm(node)
    node._answer(state_frame(3 + n, np.zeros(5)), time.monotonic_ns())
    assert node.state == P.NodeState.RUNNING and node.recorder.data[-1]["flags"] & 0b10100001 == 0


def test_a_state_from_the_future_does_not_move_the_clock(node):
    arm(node)
    now = time.monotonic_ns()
    node._answer(state_frame(1, np.zeros(5), t_ns=now), now)
    node._answer(state_frame(2, np.zeros(5), t_ns=now + 10**15), time.monotonic_ns())  # forged: far ahead
    assert node.counters.clock_jumps == 1
    now = time.monotonic_ns()
    node._answer(state_frame(3, np.zeros(5), t_ns=now), now)
    assert node.counters.stale == 0 and node.state == P.NodeState.RUNNING


def test_a_policy_past_its_budget_gets_the_fallback_and_repeated_misses_safe_stop(node, monkeypatch):
    arm(node)
    node._answer(state_frame(1, np.zeros(5)), time.monotonic_ns())
    held = node.safety.last.copy()
    real_run = node.runner.session.run

    def slow(*args, **kwargs):
        time.sleep(0.01)  # 10 ms against a 2 ms budget
        return real_run(*args, **kwargs)

    monkeypatch.setattr(node.runner.session, "run", slow)
    for seq in range(2, 2 + node.profile.max_consecutive_misses):
        node._answer(state_frame(seq, np.zeros(5)), time.monotonic_ns())
        row = node.recorder.data[-1]
        assert row["flags"] & MISS_BIT and np.array_equal(row["command"], held)  # hold the last command
        time.sleep(0.012)
    assert node.counters.misses == node.profile.max_consecutive_misses
    assert node.state == P.NodeState.SAFE_STOP
    node._answer(state_frame(100, np.zeros(5)), time.monotonic_ns())
    assert node.recorder.data[-1]["command"][0] == 0.0  # the safe command


def test_stale_states_are_not_acted_on(node):
    arm(node)
    now = time.monotonic_ns()
    node._answer(state_frame(1, np.zeros(5), t_ns=now), now)
    node._answer(state_frame(2, np.zeros(5), t_ns=now - 100_000_000), time.monotonic_ns())  # 100 ms old
    assert node.counters.stale == 1 and node.safety.counts["fallbacks"] == 1


def test_control_channel_arms_estops_and_reports(node):
    thread = threading.Thread(target=node.run, kwargs={"duration_s": 3.0})
    thread.start()
    client = ControlClient(node.profile.endpoints.control, timeout_s=2.0)
    try:
        assert client.send(P.MsgType.HEARTBEAT)["node_state"] == "IDLE"
        assert client.send(P.MsgType.ARM)["node_state"] == "ARMED"
        assert client.send(P.MsgType.ESTOP)["node_state"] == "SAFE_STOP"
        assert client.send(P.MsgType.ARM)["node_state"] == "ARMED"
        assert client.send(P.MsgType.DISARM)["node_state"] == "IDLE"
    finally:
        client.close()
        node.request_stop()
        thread.join()


def test_serving_path_imports_no_training_stack():
    code = ("import sys, qsm_robot.serve.node, qsm_robot.serve.client, qsm_robot.cli.serve, qsm_robot.calibrate.record, "
            "qsm_robot.calibrate.measure; "
            "bad = [m for m in ('torch', 'mujoco', 'dm_control', 'gymnasium') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- telemetry ---------------------------------------------------------------------------------
def test_flight_recorder_keeps_the_last_ticks_in_fixed_memory_and_counts_them_all():
    from qsm_robot.serve.telemetry import FlightRecorder

    rec = FlightRecorder(obs_dim=2, act_dim=1, capacity=100)
    nbytes = rec.rows.nbytes
    for i in range(250):
        rec.add(i * 1000, i * 1000 + 10 * (i + 1), i, 0, 1.0, 2, 0, [i], np.zeros(2, np.float32))
    assert rec.rows.nbytes == nbytes and rec.total == 250
    assert list(rec.data["state_seq"]) == list(range(150, 250))  # oldest first
    assert list(rec.tail(3)["state_seq"]) == [247, 248, 249]
    lat = rec.latency.percentiles()
    assert lat["max"] == 2.5 and lat["p50"] == pytest.approx(1.25, rel=0.03)  # whole run: 0.01 .. 2.5 us
