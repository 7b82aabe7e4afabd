"""qsm-serve: protocol, safety chain (property-based), node behaviour, and the no-torch rule."""

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import CARTPOLE_IO, SHAPES, cartpole_io, make_contract, profile_data

from qsm_robot.serve import protocol as P
from qsm_robot.serve.client import ControlClient
from qsm_robot.serve.core import NodeCore
from qsm_robot.serve.node import ServeNode
from qsm_robot.serve.policy_runner import PolicyRunner
from qsm_robot.serve.profile import Profile, ProfileError, check_contract
from qsm_robot.serve.safety import SafetyChain, SafetyConfig


def profile_dict(tmp_path, **overrides):
    base = {"rate_hz": 100, "latency_budget_ms": 2.0, "max_delta_per_tick": [0.3], "stale_periods": 3,
            "endpoints": {k: f"ipc://{tmp_path}/{k}.sock" for k in ("state", "command", "control")}}
    return profile_data("test", **{**base, **overrides})


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model


# --- protocol ----------------------------------------------------------------------------------
def test_message_round_trip():
    frame = P.encode(P.MsgType.COMMAND, 7, [1.5, -2.0], ref=3, flags=P.CommandFlag.FALLBACK, t_ns=123)
    msg = P.decode(frame)
    assert (msg.type, msg.seq, msg.ref, msg.flags, msg.t_ns) == (P.MsgType.COMMAND, 7, 3, 1, 123)
    assert msg.payload.tolist() == [1.5, -2.0] and len(frame) == 40 + 8


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


# --- STATUS ------------------------------------------------------------------------------------
def full_status(**changes):
    from qsm_robot.serve.status import SCALARS, Status

    values = {f.name: i + 2**40 for i, f in enumerate(SCALARS)}  # above float32's exact integers
    values.update(node_state=P.NodeState.SAFE_STOP, p50_us=12.5, p99_us=float("nan"), max_us=1e6 + 0.25,
                  calibration_id="0a1b2c", latency_budget_ms=1.15, act_dim=2, obs_dim=3,
                  max_delta_per_tick=(0.25, 0.5), obs_low=None, obs_high=(1.0, 2.0, 3.0))
    return Status(**{**values, **changes})


def test_status_round_trips_exactly_through_a_frame():
    from qsm_robot.serve.status import Status, payload_values

    status = full_status()
    frame = P.encode(P.MsgType.STATUS, 9, status.encode(), ref=4)
    assert len(frame) == P.HEADER_SIZE + 8 * payload_values(2, 3)
    back = Status.decode(P.decode(frame).payload)
    assert back.ticks == 2**40 + 1 and back.ticks - 1 == status.ticks - 1  # counters survive exactly
    assert back.p99_us != back.p99_us and back == full_status(p99_us=back.p99_us)
    assert Status.decode(full_status(calibration_id=None).encode()).calibration_id is None
    d = back.to_dict()
    assert d["node_state"] == "SAFE_STOP" and d["obs_low"] is None and d["max_delta_per_tick"] == [0.25, 0.5]
    assert json.loads(json.dumps(d, allow_nan=True))["ticks"] == 2**40 + 1


@pytest.mark.parametrize("cut", [8, 16, 3])
def test_a_status_payload_of_the_wrong_size_is_a_protocol_error(cut):
    from qsm_robot.serve.status import Status

    with pytest.raises(P.ProtocolError):
        Status.decode(full_status().encode()[:-cut])


def test_the_protocol_document_lists_exactly_the_status_fields():
    from conftest import REPO
    from qsm_robot.serve.status import markdown_table

    text = (REPO / "docs" / "PROTOCOL.md").read_text()
    table = text.split("<!-- status-table: begin -->\n", 1)[1].split("\n<!-- status-table: end -->", 1)[0]
    assert table == markdown_table(), ("docs/PROTOCOL.md's STATUS table is out of date: paste the output of "
                                       "python -c 'from qsm_robot.serve.status import markdown_table; "
                                       "print(markdown_table())'")


def test_the_operator_side_needs_no_onnxruntime():
    """The operator client, and qsm-serve status, work on a laptop without onnxruntime."""
    code = ("import sys; sys.modules['onnxruntime'] = None; "
            "import qsm_robot.serve.client, qsm_robot.serve.status; from qsm_robot.cli.serve import main; "
            "rc = main(['status', '--endpoint', 'ipc:///nonexistent/qsm-control.sock', '--timeout', '0.05']); "
            "assert rc == 2, rc; bad = [m for m, v in sys.modules.items() "
            "if v is not None and m.startswith(('onnx', 'qsm_robot.serve.node'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- state machine -----------------------------------------------------------------------------
# Written from the node's behaviour (its five state-changing methods before the table existed),
# independently of serve/state_machine.py. "-": ignored; a state: the next state.
EXPECTED_TRANSITIONS = """
state      arm     disarm  estop      good_state  misses     stale      resync     error
IDLE       ARMED   IDLE    SAFE_STOP  -           -          -          -          FAULT
ARMED      -       IDLE    SAFE_STOP  RUNNING     -          -          SAFE_STOP  FAULT
RUNNING    -       IDLE    SAFE_STOP  -           SAFE_STOP  SAFE_STOP  SAFE_STOP  FAULT
SAFE_STOP  ARMED   IDLE    SAFE_STOP  -           -          -          -          FAULT
FAULT      -       -       FAULT      -           -          -          -          FAULT
"""


def test_the_transition_table_is_exhaustive_and_as_specified():
    from qsm_robot.serve.state_machine import TRANSITIONS, Event, next_state

    header, *rows = [line.split() for line in EXPECTED_TRANSITIONS.strip().splitlines()]
    events = [Event[name.upper()] for name in header[1:]]
    assert set(events) == set(Event) and {r[0] for r in rows} == {s.name for s in P.NodeState}
    checked = 0
    for state_name, *cells in rows:
        for event, cell in zip(events, cells):
            want = None if cell == "-" else P.NodeState[cell]
            assert next_state(P.NodeState[state_name], event) == want, (state_name, event, cell)
            checked += 1
    assert checked == len(TRANSITIONS) == len(P.NodeState) * len(Event)


# --- safety chain ------------------------------------------------------------------------------
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([1e30, -1e30, np.nan, np.inf, -np.inf]))


def vectors(size: int):
    """Mostly the right size, sometimes another one: what a state or an action may look like."""
    return st.one_of(st.lists(floats, min_size=size, max_size=size), st.lists(floats, min_size=0, max_size=size + 2))


@pytest.mark.parametrize("shape", list(SHAPES))
@settings(max_examples=200, deadline=None)
@given(data=st.data(), fallback=st.sampled_from(["hold", "safe"]), soft_start=st.integers(0, 10))
def test_every_command_is_within_bounds_and_rate_limit(shape, data, fallback, soft_start):
    """Per actuator, whatever the states and actions: inside its own bounds, within its own
    change limit of the previous command (asymmetric bounds, limits differing per actuator)."""
    io = SHAPES[shape]
    n = io.act_dim
    low = np.linspace(-1.0, 0.0, n).astype(np.float32)
    high = low + np.linspace(3.0, 0.5, n).astype(np.float32)
    delta = np.linspace(0.25, 0.05, n).astype(np.float32)
    chain = SafetyChain(SafetyConfig(obs_dim=io.obs_dim, act_dim=n, action_low=low, action_high=high,
                                     safe_command=(low + high) / 2, max_delta=delta, fallback=fallback,
                                     soft_start_ticks=soft_start, soft_start_delta=delta / 25))
    chain.arm()
    prev = chain.last.copy()
    ticks = data.draw(st.lists(st.tuples(vectors(io.obs_dim), vectors(n)), min_size=1, max_size=40))
    for obs, action in ticks:
        usable, flags = chain.check_state(np.array(obs, dtype=np.float32))
        result = chain.filter_action(np.array(action, dtype=np.float32), flags) if usable else chain.fallback_command(flags)
        c = result.command
        assert c.shape == (n,) and np.isfinite(c).all()
        assert (c >= low).all() and (c <= high).all()
        assert (np.abs(c - prev) <= delta + 1e-6).all()
        prev = c


# --- profile -----------------------------------------------------------------------------------
def policy_with(**changes) -> dict:
    """CARTPOLE_IO's JSON with some keys changed (not validated: the profile's loader does that)."""
    return {**CARTPOLE_IO.to_dict(), **changes}


@pytest.mark.parametrize("override,message", [
    ({"rate_hz": 2000}, "rate_hz: must be in [1, 1000]"),
    ({"latency_budget_ms": 20}, "latency_budget_ms: must be > 0 and below the period"),
    ({"safe_command": [5.0]}, "safe_command: must lie within the actuator bounds"),
    ({"safe_command": [0.0, 0.0]}, "safe_command: must have act_dim=1 values"),
    ({"obs_low": [0.0] * 4, "obs_high": [1.0] * 4}, "obs_low: must have obs_dim=5 values"),
    ({"policy": policy_with(action_low=[-1.0, 0.0])}, "policy: action_low: must have one value per actuator (1)"),
    ({"policy": policy_with(action_high=[-2.0])}, "policy: action_high: must be above action_low"),
    ({"policy": policy_with(control_period_s=0)}, "policy: control_period_s: must be in (0, 60]"),
    ({"policy": {k: v for k, v in CARTPOLE_IO.to_dict().items() if k != "obs"}}, "policy: missing keys ['obs']"),
    ({"fallback": "panic"}, "fallback: must be 'hold' or 'safe'"),
    ({"robot": {"episode_steps": 0}}, "robot: robot.episode_steps must be >= 1"),
    ({"typo_key": 1}, "unknown keys ['typo_key']"),
    ({"task": "cartpole-swingup"}, "unknown keys ['task'] (task: part of \"policy\" since profile_version 2)"),
    ({"profile_version": 3}, "profile_version: must be 2, got 3"),
])
def test_invalid_profiles_name_the_field(tmp_path, override, message):
    with pytest.raises(ProfileError, match=re.escape(message)):
        Profile.from_dict(profile_dict(tmp_path, **override))


@pytest.mark.parametrize("rate_hz,ok", [(1, True), (1000, True), (0.5, False), (1001, False)])
def test_rate_hz_may_be_1_to_1000(tmp_path, rate_hz, ok):
    data = profile_dict(tmp_path, rate_hz=rate_hz, latency_budget_ms=0.5, check_control_period=False)
    if ok:
        assert Profile.from_dict(data).period_s == pytest.approx(1 / rate_hz)
    else:
        with pytest.raises(ProfileError, match=re.escape(f"rate_hz: must be in [1, 1000], got {rate_hz}")):
            Profile.from_dict(data)


def test_rate_and_episode_steps_default_to_the_policys(tmp_path):
    data = profile_dict(tmp_path, policy=cartpole_io(control_period_s=0.02, action_repeat=2, episode_steps=500).to_dict())
    del data["rate_hz"]
    profile = Profile.from_dict(data)
    assert profile.rate_hz == pytest.approx(50) and profile.robot.episode_steps == 500
    assert Profile.from_dict({**data, "rate_hz": None, "robot": {"episode_steps": None}}) == profile
    assert Profile.from_dict({**data, "rate_hz": 25, "check_control_period": False, "robot": {"episode_steps": 7}}).robot.episode_steps == 7
    # What qsm-sim and calibration read back (to_dict) is the same profile, with the values resolved.
    assert Profile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_profile_embeds_the_policy_io_and_derives_the_rest(tmp_path):
    profile = Profile.from_dict(profile_dict(tmp_path))
    assert profile.policy == CARTPOLE_IO and profile.to_dict()["policy"] == CARTPOLE_IO.to_dict()
    assert (profile.task, profile.obs_dim, profile.act_dim, profile.action_low, profile.action_high) == \
        ("cartpole-swingup", 5, 1, (-1.0,), (1.0,))
    assert profile.max_delta_per_tick == [0.3]
    assert Profile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_a_version_1_profile_is_refused_with_the_command_that_writes_a_version_2_one(tmp_path):
    v1 = {"name": "old", "task": "cartpole-swingup", "obs_dim": 5, "act_dim": 1, "action_low": [-1.0],
          "action_high": [1.0], "safe_command": [0.0], "rate_hz": 100}  # as deploy/profiles held them
    for data in (v1, {**v1, "profile_version": 1}):
        with pytest.raises(ProfileError) as info:
            Profile.from_dict(data)
        text = str(info.value)
        assert "profile 'old': profile_version 1" in text and "reads profile_version 2" in text
        assert "qsm-serve profile --model MODEL.onnx --name NAME" in text


def test_shipped_profiles_load():
    from conftest import REPO

    paths = sorted((REPO / "deploy" / "profiles").glob("*.json"))
    assert len(paths) >= 4
    for path in paths:
        profile = Profile.load(path)
        io = SHAPES[path.stem.split("-")[0]]  # cartpole-*, walker-*
        assert profile.name == path.stem and profile.policy == io
        check_contract(profile, make_contract(io))
    sim = Profile.load(REPO / "deploy" / "profiles" / "cartpole-sim.json")
    assert sim.rate_hz == 100 and sim.check_control_period and sim.robot.episode_steps == 1000
    walker = Profile.load(REPO / "deploy" / "profiles" / "walker-sim.json")
    assert walker.rate_hz == 40 and walker.check_control_period and walker.act_dim == 6


def test_a_model_that_fits_the_profile_is_accepted(tmp_path):
    check_contract(Profile.from_dict(profile_dict(tmp_path)), make_contract())
    # Without the period check, a model of another period and repeat fits a profile of any rate.
    timing = Profile.from_dict(profile_dict(tmp_path, rate_hz=500, latency_budget_ms=1.0, check_control_period=False))
    check_contract(timing, make_contract(control_period_s=0.02, action_repeat=2))


def test_a_model_that_does_not_fit_the_profile_is_refused_with_every_mismatch(tmp_path):
    profile = Profile.from_dict(profile_dict(tmp_path))
    bad = make_contract(task="cartpole-balance", obs=(("velocity", 2), ("position", 3)), action_names=("push",),
                        action_low=(-2.0,), action_high=(2.0,), control_period_s=0.02, action_repeat=2)
    with pytest.raises(ProfileError) as info:
        check_contract(profile, bad)
    text = str(info.value)
    assert text.startswith("model does not match profile 'test': ")
    for expected in ("task: model 'cartpole-balance', profile 'cartpole-swingup'",
                     "obs (names, order, sizes): model [['velocity', 2], ['position', 3]], profile [['position', 3], ['velocity', 2]]",
                     "action_names: model ['push'], profile ['slide']",
                     "action_low: model [-2.0], profile [-1.0]", "action_high: model [2.0], profile [1.0]",
                     "control_period_s: model 0.02, profile 0.01", "action_repeat: model 2, profile 1",
                     "rate_hz: model 50 Hz (control period 20.000 ms), profile 100 Hz"):
        assert expected in text, (expected, text)


@pytest.mark.parametrize("change,field", [
    ({"task": "cartpole-balance"}, "task"),
    ({"obs": (("position", 3), ("velocity", 3))}, "obs (names, order, sizes)"),
    ({"obs": (("velocity", 2), ("position", 3))}, "obs (names, order, sizes)"),
    ({"obs": (("pos", 3), ("velocity", 2))}, "obs (names, order, sizes)"),
    ({"action_names": ("slider",)}, "action_names"),
    ({"action_high": (1.5,)}, "action_high"),
    ({"control_period_s": 0.02}, "control_period_s"),
])
def test_each_differing_field_is_named(tmp_path, change, field):
    profile = Profile.from_dict(profile_dict(tmp_path))
    with pytest.raises(ProfileError, match=re.escape(f"{field}: model ")):
        check_contract(profile, make_contract(**change))


def test_with_the_period_check_the_profiles_rate_must_be_the_models(tmp_path):
    profile = Profile.from_dict(profile_dict(tmp_path, rate_hz=200, latency_budget_ms=1.0))
    with pytest.raises(ProfileError) as info:
        check_contract(profile, make_contract())
    assert str(info.value) == ("model does not match profile 'test': rate_hz: model 100 Hz (control period 10.000 ms), "
                               "profile 200 Hz (leave rate_hz null to follow the policy, or set check_control_period "
                               "false for a timing benchmark)")
    check_contract(replace(profile, check_control_period=False), make_contract())


# --- the node's core, driven frame by frame without sockets (serve/core.py) ---------------------
@pytest.fixture
def core(tmp_path, model_path):
    c = NodeCore(Profile.from_dict(profile_dict(tmp_path)), PolicyRunner(model_path, seed=0))
    yield c
    c.runner.close()


@pytest.fixture
def node(tmp_path, model_path):
    n = ServeNode(model_path, Profile.from_dict(profile_dict(tmp_path)), seed=0)
    yield n
    n.close()


def arm(core):
    assert core.arm("test")


def state_frame(seq, obs, t_ns=None):
    return P.encode(P.MsgType.STATE, seq, obs, t_ns=t_ns)


@pytest.mark.parametrize("shape", list(SHAPES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_node_commands_stay_safe_whatever_arrives(tmp_path_factory, tiny_models, shape, data):
    """The whole node (admission, safety chain, policy) on each shape: every command it sends is
    finite, inside the bounds and within the per-actuator change limit of the one before."""
    io = SHAPES[shape]
    limit = np.linspace(0.3, 0.1, io.act_dim)
    tmp = tmp_path_factory.mktemp("prop")
    profile = Profile.from_dict(profile_dict(tmp, policy=io.to_dict(), safe_command=[0.0] * io.act_dim,
                                             rate_hz=io.rate_hz, max_delta_per_tick=limit.tolist()))
    inputs = data.draw(st.lists(st.one_of(vectors(io.obs_dim).map(lambda v: ("obs", v)),
                                          st.binary(max_size=64).map(lambda b: ("bytes", b))), min_size=1, max_size=25))
    n = NodeCore(profile, PolicyRunner(tiny_models[shape], seed=0))
    try:
        arm(n)
        n.answer(state_frame(1, np.zeros(io.obs_dim)), time.monotonic_ns())
        for i, (kind, value) in enumerate(inputs, start=2):
            frame = state_frame(i, np.array(value, np.float32)) if kind == "obs" else value
            n.answer(frame, time.monotonic_ns())
        commands = n.recorder.data["command"]
        assert commands.shape[1] == io.act_dim
        assert np.isfinite(commands).all() and (np.abs(commands) <= 1.0).all()
        steps = np.abs(np.diff(np.concatenate([np.zeros((1, io.act_dim)), commands]), axis=0))
        assert (steps <= limit + 1e-6).all()
    finally:
        n.runner.close()


def test_replayed_and_out_of_order_states_are_ignored(core):
    arm(core)
    core.answer(state_frame(5, np.zeros(5)), time.monotonic_ns())
    core.answer(state_frame(5, np.zeros(5)), time.monotonic_ns())
    core.answer(state_frame(3, np.zeros(5)), time.monotonic_ns())
    assert core.counters.ticks == 1 and core.counters.replayed == 2


def test_a_forged_sequence_number_costs_a_resync_and_a_safe_stop_not_the_stream(core):
    arm(core)
    now = time.monotonic_ns()
    core.answer(state_frame(1, np.zeros(5), t_ns=now), now)
    core.answer(state_frame(2**63, np.zeros(5)), time.monotonic_ns())  # forged: every real seq is now "old"
    n = core.profile.resync_threshold  # the first rejected state starts the run that counts: n more re-sync
    for seq in range(2, 3 + n):
        core.answer(state_frame(seq, np.zeros(5)), time.monotonic_ns())
    assert core.counters.replayed == n + 1 and core.state == P.NodeState.RUNNING
    core.answer(state_frame(3 + n, np.zeros(5)), time.monotonic_ns())
    assert core.counters.resyncs == 1 and core.state == P.NodeState.SAFE_STOP
    arm(core)
    core.answer(state_frame(4 + n, np.zeros(5)), time.monotonic_ns())
    assert core.state == P.NodeState.RUNNING and core.recorder.data[-1]["flags"] & int(P.TickFlag.STATE_INVALID | P.TickFlag.FALLBACK | P.TickFlag.STALE) == 0


def test_a_state_from_the_future_does_not_move_the_clock(core):
    arm(core)
    now = time.monotonic_ns()
    core.answer(state_frame(1, np.zeros(5), t_ns=now), now)
    core.answer(state_frame(2, np.zeros(5), t_ns=now + 10**15), time.monotonic_ns())  # forged: far ahead
    assert core.counters.clock_jumps == 1
    now = time.monotonic_ns()
    core.answer(state_frame(3, np.zeros(5), t_ns=now), now)
    assert core.counters.stale == 0 and core.state == P.NodeState.RUNNING


def test_a_policy_past_its_budget_gets_the_fallback_and_repeated_misses_safe_stop(core, monkeypatch):
    arm(core)
    core.answer(state_frame(1, np.zeros(5)), time.monotonic_ns())
    held = core.safety.last.copy()
    real_run = core.runner.session.run

    def slow(*args, **kwargs):
        time.sleep(0.01)  # 10 ms against a 2 ms budget
        return real_run(*args, **kwargs)

    monkeypatch.setattr(core.runner.session, "run", slow)
    already = core.counters.misses  # 1 when a loaded machine made the first, real call miss its budget too
    for seq in range(2, 2 + core.profile.max_consecutive_misses - already):
        core.answer(state_frame(seq, np.zeros(5)), time.monotonic_ns())
        row = core.recorder.data[-1]
        assert row["flags"] & int(P.TickFlag.MISS) and np.array_equal(row["command"], held)  # hold the last command
        time.sleep(0.012)
    assert core.counters.misses == core.profile.max_consecutive_misses
    assert core.state == P.NodeState.SAFE_STOP
    core.answer(state_frame(100, np.zeros(5)), time.monotonic_ns())
    assert core.recorder.data[-1]["command"][0] == 0.0  # the safe command


def test_injected_stalls_are_misses_flagged_as_injected(tmp_path, model_path):
    from qsm_robot.serve.fault_injection import SpikyRunner

    with pytest.raises(ValueError, match="must be >= 0"):
        SpikyRunner(object(), -1, 1.0)
    profile = Profile.from_dict(profile_dict(tmp_path))
    runner = SpikyRunner(PolicyRunner(model_path), every=3, spike_ms=3 * profile.latency_budget_ms)
    n = NodeCore(profile, runner)
    try:
        arm(n)
        for seq in range(1, 7):
            n.answer(state_frame(seq, np.zeros(5)), time.monotonic_ns())
        flags = n.recorder.data["flags"].astype(int)
        injected = (flags & int(P.TickFlag.INJECTED_STALL)) > 0
        assert injected.tolist() == [False, False, True, False, False, True] and runner.spikes == 2
        assert ((flags & int(P.TickFlag.MISS)) > 0)[injected].all() and n.counters.misses >= 2
    finally:
        n.runner.close()


def test_a_node_in_fault_refuses_arm_and_ignores_disarm(core):
    """FAULT is left only by a restart: not by ARM, DISARM, nor ARM after an e-stop."""
    from qsm_robot.serve.state_machine import Event

    core.event(Event.ERROR, "test")
    assert core.state == P.NodeState.FAULT and not core.arm("test") and core.state == P.NodeState.FAULT
    assert not core.event(Event.DISARM, "test") and core.state == P.NodeState.FAULT
    core.event(Event.ESTOP, "test")
    assert core.state == P.NodeState.FAULT and not core.arm("test") and core.state == P.NodeState.FAULT


def test_stale_states_are_not_acted_on(core):
    arm(core)
    now = time.monotonic_ns()
    core.answer(state_frame(1, np.zeros(5), t_ns=now), now)
    # the fresh state's own outcome is not this test's (a loaded machine can make it miss its budget)
    fallbacks = core.safety.counts["fallbacks"]
    core.answer(state_frame(2, np.zeros(5), t_ns=now - 100_000_000), time.monotonic_ns())  # 100 ms old
    assert core.counters.stale == 1 and core.safety.counts["fallbacks"] == fallbacks + 1


def test_the_core_needs_no_sockets():
    """The node's logic imports no ZeroMQ: it is driven by frames and times alone."""
    code = ("import sys; sys.modules['zmq'] = None; import qsm_robot.serve.core; "
            "assert 'zmq' not in [m for m, v in sys.modules.items() if v is not None]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_control_messages_change_state_and_answer_with_status(core):
    """control(): ARM, ESTOP, ARM, DISARM move through the table; each reply is a STATUS frame
    that refers to the request's seq; a malformed or unknown message gets no reply and is counted."""
    from qsm_robot.serve.status import Status

    states = []
    for seq, kind in enumerate([P.MsgType.HEARTBEAT, P.MsgType.ARM, P.MsgType.ESTOP, P.MsgType.ARM,
                                P.MsgType.DISARM], start=1):
        reply = P.decode(core.control(P.encode(kind, seq, np.zeros(0))))
        assert reply.type == P.MsgType.STATUS and reply.ref == seq
        states.append(Status.decode(reply.payload).node_state.name)
    assert states == ["IDLE", "ARMED", "SAFE_STOP", "ARMED", "IDLE"]
    assert core.control(b"garbage") is None
    assert core.control(P.encode(P.MsgType.STATE, 9, np.zeros(5))) is None  # a state on the control channel
    assert core.counters.malformed == 2 and core.state == P.NodeState.IDLE


@pytest.mark.parametrize("resync_after,stale", [(3, 25), (None, 4)])
def test_resync_and_stale_safe_stop_are_separate_knobs(tmp_path, model_path, resync_after, stale):
    """resync_after_rejected rejected states in a row re-sync; null falls back to
    max_consecutive_stale (profiles written before the key keep their behaviour)."""
    profile = Profile.from_dict(profile_dict(tmp_path, resync_after_rejected=resync_after, max_consecutive_stale=stale))
    expected = resync_after if resync_after is not None else stale
    assert profile.resync_threshold == expected
    c = NodeCore(profile, PolicyRunner(model_path, seed=0))
    try:
        arm(c)
        c.answer(state_frame(10**6, np.zeros(5)), time.monotonic_ns())
        for seq in range(1, expected + 2):  # rejected: seq went back (the first starts the run that counts)
            assert c.answer(state_frame(seq, np.zeros(5)), time.monotonic_ns()) is None
        assert c.counters.resyncs == 0
        assert c.answer(state_frame(expected + 2, np.zeros(5)), time.monotonic_ns()) is not None
        assert c.counters.resyncs == 1 and c.state == P.NodeState.SAFE_STOP
    finally:
        c.runner.close()


def test_replayed_frames_out_of_order_never_force_a_resync(core):
    """Old frames replayed in random order interleaved with the robot's stream are dropped and
    counted, but they are not a locked-out stream: no re-sync, no safe-stop (however many)."""
    arm(core)
    rng = np.random.default_rng(0)
    for seq in range(1, 200):
        core.answer(state_frame(seq, np.zeros(5)), time.monotonic_ns())
        if seq > 20:
            core.answer(state_frame(int(rng.integers(1, seq - 5)), np.zeros(5)), time.monotonic_ns())
    assert core.counters.replayed == 179 and core.counters.resyncs == 0 and core.state == P.NodeState.RUNNING


def test_a_profile_without_the_resync_key_keeps_its_calibration_fingerprint(tmp_path):
    data = profile_dict(tmp_path)
    data.pop("resync_after_rejected", None)
    old = Profile.from_dict(data)
    assert "resync_after_rejected" not in old.calibration_basis()
    assert Profile.from_dict({**data, "resync_after_rejected": 5}).fingerprint() != old.fingerprint()


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
            "qsm_robot.calibrate.measure, qsm_robot.policy_io, qsm_robot.export.contract, qsm_robot.export.runtime; "
            "bad = [m for m in ('torch', 'mujoco', 'dm_control', 'gymnasium') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- telemetry ---------------------------------------------------------------------------------
def test_flight_recorder_keeps_the_last_ticks_in_fixed_memory_and_counts_them_all():
    from qsm_robot.serve.telemetry import FlightRecorder

    rec = FlightRecorder(obs_dim=2, act_dim=1, capacity=100)
    nbytes = rec.rows.nbytes
    for i in range(250):
        rec.add(5000 + i * 1000, 5000 + i * 1000 + 10 * (i + 1), i, 0, 1.0, 2, 0, [i], np.zeros(2, np.float32))
    assert rec.rows.nbytes == nbytes and rec.total == 250
    assert (rec.first_recv_ns, rec.last_recv_ns) == (5000, 5000 + 249 * 1000)  # the whole run's span
    assert list(rec.data["state_seq"]) == list(range(150, 250))  # oldest first
    assert list(rec.tail(3)["state_seq"]) == [247, 248, 249]
    lat = rec.latency.percentiles()
    assert lat["max"] == 2.5 and lat["p50"] == pytest.approx(1.25, rel=0.03)  # whole run: 0.01 .. 2.5 us
