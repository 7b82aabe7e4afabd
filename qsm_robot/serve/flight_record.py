"""Flight records as MCAP (https://mcap.dev): one file per side of a run, which Foxglove,
PlotJuggler and rerun open as they are.

One channel per kind, each with a JSON schema, messages JSON-encoded:

    node (qsm-serve run)                      robot (qsm-sim --record, RobotClient(record_ticks=N))
    /states      the state answered            /states      the state sent (or dropped)
    /commands    the command sent              /commands    the command applied
    /latencies   node, policy and transit µs   /latencies   state sent -> its command received, µs
    /flags       the tick's TickFlag bits      /flags       late, one tick late, watchdog, clamp, ...
    /node_state  the node's state, on change

Why JSON: Foxglove and PlotJuggler decode JSON channels from their JSON schema with nothing
generated or installed (protobuf would need a compiler step and a runtime on the robot computer,
ROS 2 messages a ROS install), every field is plottable by name, and the chunks are
zstd-compressed, so the text costs little on disk. Non-finite numbers (a NaN state, no policy
call) are written as null, which JSON can carry.

Time: ``log_time`` is the monotonic clock (CLOCK_MONOTONIC, the one both sides stamp the protocol
with) plus the offset to the Unix clock measured when the file is written, so that a node's and
a robot's file of one run line up in a viewer; the raw monotonic nanoseconds stay in the
messages (``t_*_ns``) and the offset in the ``qsm_robot`` metadata record.

``read`` gives the channels back as lists of dicts; ``node_ticks`` and ``robot_ticks`` give the
per-tick table (a numpy structured array) that the campaigns and tests compute with.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from qsm_robot.files import atomic_write
from qsm_robot.serve.protocol import NodeState, TickFlag

FLAG_NAMES = tuple(f.name.lower() for f in TickFlag)
"""The node's ``/flags``: bit i of ``bits`` is TickFlag named FLAG_NAMES[i]."""
ROBOT_FLAG_NAMES = ("not_sent", "late", "one_tick_late", "watchdog", "rate_clamped", "episode_start")
"""The robot's ``/flags``: the state was not sent (a dropped or garbage frame); no command by the
cutoff (the last one held, or the watchdog's: RobotReport.commands_late); the command applied
answers an earlier state (one tick late); the watchdog's safe command; the change was clamped to
max_delta_per_tick; the state opened an episode."""
METADATA = "qsm_robot"
"""Name of the metadata record (side, flag names, clock offset, counts, profile, model)."""
TOPICS = {"node": ("/states", "/commands", "/latencies", "/flags", "/node_state"),
          "robot": ("/states", "/commands", "/latencies", "/flags")}

_INT, _NUM, _BOOL = {"type": "integer"}, {"type": ["number", "null"]}, {"type": "boolean"}
_VEC = {"type": "array", "items": {"type": ["number", "null"]}}


def _schema(name: str, description: str, props: dict) -> tuple[str, dict]:
    return name, {"title": name, "description": description, "type": "object", "properties": props,
                  "required": list(props)}


def _flag_props(names: Iterable[str]) -> dict:
    return {"bits": _INT, **{n: _BOOL for n in names}}


SCHEMAS = {
    "node": {
        "/states": _schema("qsm_robot.node.State", "a STATE the node answered",
                           {"seq": _INT, "t_ns": _INT, "t_recv_ns": _INT, "obs": _VEC}),
        "/commands": _schema("qsm_robot.node.Command", "the COMMAND that answered it (ref = the state's seq)",
                             {"ref": _INT, "t_send_ns": _INT, "command": _VEC, "fallback": _BOOL}),
        "/latencies": _schema("qsm_robot.node.Latency", "µs: state received -> command sent, the policy call "
                              "(null: no call), the state's transit (sender's clock -> received)",
                              {"seq": _INT, "node_us": _NUM, "policy_us": _NUM, "transit_us": _NUM}),
        "/flags": _schema("qsm_robot.node.Flags", "the tick's TickFlag bits, and each by name",
                          {"seq": _INT, **_flag_props(FLAG_NAMES)}),
        "/node_state": _schema("qsm_robot.node.NodeState", "the node's state after a tick, when it changed",
                               {"seq": _INT, "state": _INT, "name": {"type": "string"}}),
    },
    "robot": {
        "/states": _schema("qsm_robot.robot.State", "a STATE the robot sent (t_ns 0: not sent)",
                           {"seq": _INT, "t_ns": _INT, "obs": _VEC}),
        "/commands": _schema("qsm_robot.robot.Command", "the command applied this tick (ref: the state it "
                             "answers; 0 for the safe command before any)",
                             {"seq": _INT, "ref": _INT, "t_apply_ns": _INT, "command": _VEC}),
        "/latencies": _schema("qsm_robot.robot.Latency", "µs: this tick's state sent -> its command received "
                              "(null: it did not come by the cutoff)", {"seq": _INT, "command_us": _NUM}),
        "/flags": _schema("qsm_robot.robot.Flags", "the tick's robot flags, and each by name",
                          {"seq": _INT, **_flag_props(ROBOT_FLAG_NAMES)}),
    },
}


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _vec(a: np.ndarray) -> list:
    return [_finite(x) for x in np.asarray(a, np.float64).tolist()]


def _flags(bits: int, names: tuple[str, ...]) -> dict:
    return {"bits": int(bits), **{n: bool(bits >> i & 1) for i, n in enumerate(names)}}


def monotonic_to_unix_ns() -> int:
    """Add to a CLOCK_MONOTONIC time to get Unix time (as of now)."""
    return time.time_ns() - time.monotonic_ns()


def write(path: str | Path, side: str, messages: Iterable[tuple[str, int, int, int, dict]], metadata: dict,
          offset_ns: int) -> Path:
    """Write an MCAP flight record atomically (temporary file, fsync, rename). ``messages``:
    (topic, monotonic log time ns, monotonic publish time ns, sequence, payload), in time order."""
    from mcap.writer import CompressionType, Writer

    def produce(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            w = Writer(f, compression=CompressionType.ZSTD)
            w.start(profile="", library="qsm-robot")
            channels = {}
            for topic, (name, schema) in SCHEMAS[side].items():
                sid = w.register_schema(name=name, encoding="jsonschema", data=json.dumps(schema).encode())
                channels[topic] = w.register_channel(topic=topic, message_encoding="json", schema_id=sid)
            for topic, log_ns, pub_ns, seq, payload in messages:
                w.add_message(channels[topic], log_time=max(0, log_ns + offset_ns), publish_time=max(0, pub_ns + offset_ns),
                              sequence=seq & 0xFFFFFFFF, data=json.dumps(payload, allow_nan=False).encode())
            w.add_metadata(METADATA, {"side": side, "monotonic_to_unix_ns": str(offset_ns),
                                      **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}})
            w.finish()

    return atomic_write(path, produce)


@dataclass
class FlightRecord:
    """An MCAP flight record read back: each channel's messages (dicts, with ``log_time_ns``, the
    Unix-based log time), and the ``qsm_robot`` metadata (values JSON-decoded where they were JSON)."""

    side: str
    channels: dict[str, list[dict]]
    metadata: dict


def read(path: str | Path) -> FlightRecord:
    """Read a flight record with mcap's reader; ValueError when it is not one."""
    from mcap.reader import make_reader

    channels: dict[str, list[dict]] = {}
    meta: dict = {}
    with open(path, "rb") as f:
        reader = make_reader(f)
        for _, channel, message in reader.iter_messages(log_time_order=False):
            channels.setdefault(channel.topic, []).append({**json.loads(message.data), "log_time_ns": message.log_time})
    with open(path, "rb") as f:
        for record in make_reader(f).iter_metadata():
            if record.name == METADATA:
                for k, v in record.metadata.items():
                    try:
                        meta[k] = json.loads(v)
                    except ValueError:
                        meta[k] = v
    if "side" not in meta:
        raise ValueError(f"{path} is not a qsm-robot flight record (no '{METADATA}' metadata)")
    for topic in TOPICS[meta["side"]]:
        channels.setdefault(topic, [])
    return FlightRecord(str(meta["side"]), channels, meta)


def _array(values: list, dtype=np.float32) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype)


def node_dtype(obs_dim: int, act_dim: int) -> np.dtype:
    """One row of the node's flight record (FlightRecorder's ring; ``node_ticks``)."""
    return np.dtype([
        ("t_recv_ns", "i8"), ("t_send_ns", "i8"), ("state_seq", "u8"), ("state_t_ns", "i8"),
        ("policy_us", "f4"), ("node_state", "u1"), ("flags", "u2"),
        ("command", "f4", (act_dim,)), ("obs", "f4", (obs_dim,)),
    ])


def robot_dtype(obs_dim: int, act_dim: int) -> np.dtype:
    """One row of the robot's flight record (the robot client's ring; ``robot_ticks``)."""
    return np.dtype([
        ("seq", "u8"), ("t_sent_ns", "i8"), ("t_apply_ns", "i8"), ("ref", "u8"), ("command_us", "f4"),
        ("flags", "u2"), ("command", "f4", (act_dim,)), ("obs", "f4", (obs_dim,)),
    ])


def node_messages(rows: np.ndarray):
    """The node's MCAP messages for its ring's rows (oldest first)."""
    last_state = None
    for r in rows:
        seq, t_recv, t_send = int(r["state_seq"]), int(r["t_recv_ns"]), int(r["t_send_ns"])
        yield "/states", t_recv, int(r["state_t_ns"]), seq, {"seq": seq, "t_ns": int(r["state_t_ns"]),
                                                             "t_recv_ns": t_recv, "obs": _vec(r["obs"])}
        bits = int(r["flags"])
        yield "/commands", t_send, t_send, seq, {"ref": seq, "t_send_ns": t_send, "command": _vec(r["command"]),
                                                 "fallback": bool(bits & TickFlag.FALLBACK)}
        yield "/latencies", t_send, t_send, seq, {"seq": seq, "node_us": (t_send - t_recv) / 1e3,
                                                  "policy_us": _finite(r["policy_us"]),
                                                  "transit_us": (t_recv - int(r["state_t_ns"])) / 1e3}
        yield "/flags", t_send, t_send, seq, {"seq": seq, **_flags(bits, FLAG_NAMES)}
        if int(r["node_state"]) != last_state:
            last_state = int(r["node_state"])
            yield "/node_state", t_send, t_send, seq, {"seq": seq, "state": last_state,
                                                       "name": NodeState(last_state).name}


def node_ticks(record: FlightRecord | str | Path) -> np.ndarray:
    """The node's per-tick table (``node_dtype``) from its flight record, oldest first."""
    rec = record if isinstance(record, FlightRecord) else read(record)
    if rec.side != "node":
        raise ValueError(f"a {rec.side}'s flight record, not a node's")
    ch = rec.channels
    n = len(ch["/states"])
    rows = np.zeros(n, node_dtype(int(rec.metadata["obs_dim"]), int(rec.metadata["act_dim"])))
    if not n:
        return rows
    rows["state_seq"] = [m["seq"] for m in ch["/states"]]
    rows["state_t_ns"] = [m["t_ns"] for m in ch["/states"]]
    rows["t_recv_ns"] = [m["t_recv_ns"] for m in ch["/states"]]
    rows["obs"] = [_array(m["obs"]) for m in ch["/states"]]
    rows["t_send_ns"] = [m["t_send_ns"] for m in ch["/commands"]]
    rows["command"] = [_array(m["command"]) for m in ch["/commands"]]
    rows["policy_us"] = _array([m["policy_us"] for m in ch["/latencies"]])
    rows["flags"] = [m["bits"] for m in ch["/flags"]]
    # /node_state holds the changes: carry each forward to the ticks after it.
    changes = {m["seq"]: m["state"] for m in ch["/node_state"]}
    state = 0
    for i, seq in enumerate(rows["state_seq"].tolist()):
        state = changes.get(seq, state)
        rows["node_state"][i] = state
    return rows


def robot_messages(rows: np.ndarray):
    """The robot's MCAP messages for its ring's rows (oldest first)."""
    for r in rows:
        seq, t_sent, t_apply = int(r["seq"]), int(r["t_sent_ns"]), int(r["t_apply_ns"])
        yield "/states", t_sent or t_apply, t_sent or t_apply, seq, {"seq": seq, "t_ns": t_sent, "obs": _vec(r["obs"])}
        yield "/commands", t_apply, t_apply, seq, {"seq": seq, "ref": int(r["ref"]), "t_apply_ns": t_apply,
                                                   "command": _vec(r["command"])}
        yield "/latencies", t_apply, t_apply, seq, {"seq": seq, "command_us": _finite(r["command_us"])}
        yield "/flags", t_apply, t_apply, seq, {"seq": seq, **_flags(int(r["flags"]), ROBOT_FLAG_NAMES)}


def robot_ticks(record: FlightRecord | str | Path) -> np.ndarray:
    """The robot's per-tick table (``robot_dtype``) from its flight record, oldest first."""
    rec = record if isinstance(record, FlightRecord) else read(record)
    if rec.side != "robot":
        raise ValueError(f"a {rec.side}'s flight record, not a robot's")
    ch = rec.channels
    rows = np.zeros(len(ch["/states"]), robot_dtype(int(rec.metadata["obs_dim"]), int(rec.metadata["act_dim"])))
    if not len(rows):
        return rows
    rows["seq"] = [m["seq"] for m in ch["/states"]]
    rows["t_sent_ns"] = [m["t_ns"] for m in ch["/states"]]
    rows["obs"] = [_array(m["obs"]) for m in ch["/states"]]
    rows["ref"] = [m["ref"] for m in ch["/commands"]]
    rows["t_apply_ns"] = [m["t_apply_ns"] for m in ch["/commands"]]
    rows["command"] = [_array(m["command"]) for m in ch["/commands"]]
    rows["command_us"] = _array([m["command_us"] for m in ch["/latencies"]])
    rows["flags"] = [m["bits"] for m in ch["/flags"]]
    return rows


class TickRing:
    """The last ``capacity`` rows of ``dtype`` in a ring allocated (and touched) at start: memory
    stays flat however long a loop runs."""

    def __init__(self, dtype: np.dtype, capacity: int):
        if capacity < 1:
            raise ValueError(f"flight recorder capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.rows = np.empty(capacity, dtype)
        self.rows.view(np.uint8)[:] = 0  # touch every page now, not while running
        self.total = 0

    def next_row(self) -> np.void:
        r = self.rows[self.total % self.capacity]
        self.total += 1
        return r

    def tail(self, n: int) -> np.ndarray:
        """The last min(n, held) rows, oldest first."""
        n = min(n, self.total, self.capacity)
        end = self.total % self.capacity
        if n <= end:
            return self.rows[end - n:end]
        return np.concatenate([self.rows[self.capacity - (n - end):], self.rows[:end]])

    @property
    def data(self) -> np.ndarray:
        """Every row still held, oldest first."""
        return self.tail(self.capacity)
