"""MCAP flight records (serve/flight_record.py): the node's and the robot's, written and read back
with mcap's own reader: channels, JSON schemas, message counts and values."""

import json

import numpy as np
import pytest
from mcap.reader import make_reader
from test_robot_client import FakeNode, FakeRobot, make_profile

from qsm_robot.robot.client import RobotClient
from qsm_robot.serve import flight_record as FR
from qsm_robot.serve import protocol as P
from qsm_robot.serve.telemetry import FlightRecorder

F = P.TickFlag


def raw(path):
    """{topic: (schema name, schema encoding, message encoding, [decoded messages])} via mcap's reader."""
    out = {}
    with open(path, "rb") as f:
        for schema, channel, message in make_reader(f).iter_messages():
            entry = out.setdefault(channel.topic, (schema.name, schema.encoding, channel.message_encoding, []))
            entry[3].append((message.log_time, message.publish_time, message.sequence, json.loads(message.data)))
    return out


def fill_node_recorder(capacity=100, ticks=130):
    rec = FlightRecorder(obs_dim=2, act_dim=1, capacity=capacity)
    rng = np.random.default_rng(0)
    for i in range(ticks):
        t = 10**12 + i * 10_000_000
        state = int(P.NodeState.ARMED) if i < 40 else int(P.NodeState.RUNNING) if i < 120 else int(P.NodeState.SAFE_STOP)
        obs = np.array([np.nan, 1.0], np.float32) if i == 125 else rng.standard_normal(2).astype(np.float32)
        flags = int(F.STATE_INVALID | F.FALLBACK) if i == 125 else int(F.MISS | F.FALLBACK) if i % 7 == 0 else 0
        policy = float("nan") if flags else float(rng.uniform(50, 500))
        rec.add(t, t + 300_000 + i, i + 1, t - 50_000, policy, state, flags, rng.uniform(-1, 1, 1).astype(np.float32), obs)
    return rec


def test_node_record_round_trip(tmp_path):
    rec = fill_node_recorder()
    path = rec.save(tmp_path / "flight.mcap", model="m.onnx", profile=json.dumps({"name": "p"}))
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temporary name, then renamed
    channels = raw(path)
    assert set(channels) == {"/states", "/commands", "/latencies", "/flags", "/node_state"}
    for topic, (schema, encoding, msg_encoding, messages) in channels.items():
        assert encoding == "jsonschema" and msg_encoding == "json" and schema.startswith("qsm_robot.node.")
    held = rec.data  # the last 100 of 130 ticks
    for topic in ("/states", "/commands", "/latencies", "/flags"):
        assert len(channels[topic][3]) == 100
    # /node_state: the first tick held (ARMED), then each change (RUNNING at tick 40, SAFE_STOP at 120).
    assert [(m[2], m[3]["name"]) for m in channels["/node_state"][3]] == [(31, "ARMED"), (41, "RUNNING"),
                                                                        (121, "SAFE_STOP")]
    meta = FR.read(path).metadata
    offset = int(meta["monotonic_to_unix_ns"])
    log_time, publish_time, seq, state = channels["/states"][3][0]
    assert (log_time, publish_time, seq) == (int(held["t_recv_ns"][0]) + offset, int(held["state_t_ns"][0]) + offset, 31)
    assert state["obs"] == held["obs"][0].tolist()
    nan_state = channels["/states"][3][125 - 30][3]
    assert nan_state["obs"][0] is None and nan_state["obs"][1] == 1.0  # NaN travels as null
    flags = channels["/flags"][3][125 - 30][3]
    assert flags["state_invalid"] and flags["fallback"] and not flags["miss"] and flags["bits"] == int(F.STATE_INVALID | F.FALLBACK)
    assert channels["/latencies"][3][0][3]["node_us"] == pytest.approx((held["t_send_ns"][0] - held["t_recv_ns"][0]) / 1e3)
    assert meta["side"] == "node" and meta["total_ticks"] == 130 and meta["ticks_held"] == 100
    assert meta["flag_names"] == list(FR.FLAG_NAMES) and meta["model"] == "m.onnx" and meta["profile"] == {"name": "p"}
    assert sum(meta["latency_hist_counts"]) == 130
    # The per-tick table read back equals the ring, NaN for NaN.
    back = FR.node_ticks(path)
    assert back.dtype == held.dtype and len(back) == 100
    for name in held.dtype.names:
        np.testing.assert_array_equal(back[name], held[name], err_msg=name)


def test_plot_reads_the_mcap_record(tmp_path):
    pytest.importorskip("matplotlib")
    from qsm_robot.cli.serve import main

    path = fill_node_recorder().save(tmp_path / "flight.mcap")
    assert main(["plot", str(path)]) == 0 and path.with_suffix(".png").is_file()
    assert main(["plot", str(tmp_path / "nothing.mcap")]) == 2


def test_a_record_of_the_other_side_is_refused(tmp_path):
    path = fill_node_recorder(ticks=3).save(tmp_path / "flight.mcap")
    with pytest.raises(ValueError, match="node's flight record, not a robot's"):
        FR.robot_ticks(path)


def test_robot_side_record(tmp_path):
    profile = make_profile(tmp_path, rate_hz=50, max_delta_per_tick=[0.1])
    node = FakeNode(profile, value=1.0)
    robot = FakeRobot(profile.obs_dim, steps=30)
    client = RobotClient(profile, robot, log=lambda m: None, record_ticks=1000)
    try:
        report = client.run(episodes=1, connect_wait_s=0.3)
        path = client.save_record(tmp_path / "robot.mcap", scenario="fake")
    finally:
        client.close()
        node.close()
    channels = raw(path)
    assert set(channels) == {"/states", "/commands", "/latencies", "/flags"}
    assert all(len(c[3]) == 30 and c[0].startswith("qsm_robot.robot.") for c in channels.values())
    ticks = FR.robot_ticks(path)
    assert ticks["seq"].tolist() == list(range(1, 31))
    np.testing.assert_array_equal(ticks["command"][:, 0], np.float32(robot.applied))
    bit = {n: 1 << i for i, n in enumerate(FR.ROBOT_FLAG_NAMES)}
    flags = ticks["flags"].astype(int)
    assert ((flags & bit["rate_clamped"]) > 0).sum() == report.commands_rate_clamped
    assert ((flags & bit["late"]) > 0).sum() == report.commands_late
    assert ((flags & bit["one_tick_late"]) > 0).sum() == report.commands_one_tick_late
    assert flags[0] & bit["episode_start"] and not (flags[1:] & bit["episode_start"]).any()
    fresh = (flags & (bit["late"] | bit["one_tick_late"])) == 0
    assert np.isfinite(ticks["command_us"][fresh]).all() and (ticks["ref"][fresh] == ticks["seq"][fresh]).all()
    meta = FR.read(path).metadata
    assert meta["side"] == "robot" and meta["total_ticks"] == 30 and meta["scenario"] == "fake"
    assert meta["realtime"]["mlockall"]["state"] == "off"
