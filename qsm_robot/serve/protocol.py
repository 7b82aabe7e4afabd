"""Wire format of qsm-robot's control channels (docs/PROTOCOL.md is the normative text).

Every message is one ZeroMQ frame: a 40-byte little-endian header, then ``count`` float32
values (STATUS: ``count / 2`` float64 values, ``status.Status``). No pickle, no variable-length
text on the hot path.

    offset size type     field
    0      4    bytes    magic b"QSMR"
    4      1    uint8    protocol version (PROTOCOL_VERSION); at offset 4 in every version
    5      1    uint8    message type (MsgType)
    6      2    uint16   flags (bit meanings per type; 0 when unused)
    8      8    uint64   sequence number (per sender and channel, +1 per message)
    16     8    int64    sender's monotonic clock, nanoseconds
    24     8    uint64   ref: sequence number this message answers (COMMAND: the STATE's), else 0
    32     4    uint32   count: number of 4-byte payload words that follow
    36     4    uint32   reserved, 0
    40     4*count       payload: float32 values (STATUS: float64 values, two words each)

Version 1 had a 32-bit ref (and no reserved word): after 2^32 states its COMMANDs answered no
state. A frame of another version raises :class:`VersionError`, which receivers count apart from
other malformed frames.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from enum import IntEnum, IntFlag

import numpy as np

MAGIC = b"QSMR"
PROTOCOL_VERSION = 2
HEADER = struct.Struct("<4sBBHQqQII")
HEADER_SIZE = HEADER.size  # 40
VERSION_OFFSET = 4  # the version byte's place, the same in every version
MAX_COUNT = 4096  # no valid message carries more floats


class MsgType(IntEnum):
    STATE = 1       # robot -> node: observation (payload: obs), flags bit0: episode start
    COMMAND = 2     # node -> robot: actuator command (payload: action), ref = answered STATE seq
    ARM = 3         # operator -> node
    DISARM = 4      # operator -> node
    ESTOP = 5       # operator -> node
    STATUS = 6      # node -> operator: reply to a control message / status request
    HEARTBEAT = 7   # either way: liveness, no payload


class NodeState(IntEnum):
    IDLE = 0
    ARMED = 1
    RUNNING = 2
    SAFE_STOP = 3
    FAULT = 4


class CommandFlag(IntFlag):
    """COMMAND header flags."""
    POLICY = 0          # the policy's action after the safety chain
    FALLBACK = 1        # bit0: a fallback (hold last safe / safe command)
    SAFE = 2            # bit1: the node's safe command (not running, e-stop, safe-stop)


class StateFlag(IntFlag):
    """STATE header flags."""
    EPISODE_START = 1   # bit0: the first state of an episode (informational: recorded, no effect on the node)
    RESTART = 2         # bit1: the robot (re)started; set on every state until one is answered


class TickFlag(IntFlag):
    """Per-answered-state flags of the node (not on the wire): the safety chain's findings and the
    node's, kept in the flight record's ``flags`` column (uint16). The names, lower-cased and in
    bit order, are the record's ``flag_names``."""
    STATE_INVALID = 1 << 0      # the state was NaN/Inf or of the wrong size
    OBS_OUT_OF_RANGE = 1 << 1   # the state was outside the envelope
    ACTION_INVALID = 1 << 2     # the policy's action was NaN/Inf or of the wrong size
    BOUNDS_CLAMPED = 1 << 3     # the command was clamped to the actuator bounds
    RATE_CLAMPED = 1 << 4       # the command was clamped by the rate limiter
    FALLBACK = 1 << 5           # the command is a fallback (held or safe command)
    MISS = 1 << 6               # the policy missed its budget
    STALE = 1 << 7              # the state was too old to act on
    INJECTED_STALL = 1 << 8     # the policy call carried an injected stall (fault injection)


class ProtocolError(ValueError):
    """A frame that is not a valid message; the reason is in the text."""


class VersionError(ProtocolError):
    """A frame of another protocol version (its sender must be upgraded, or this side)."""

    def __init__(self, version: int):
        self.version = version
        super().__init__(f"protocol version {version}, this side speaks version {PROTOCOL_VERSION} "
                         "(docs/PROTOCOL.md): upgrade the older side")


@dataclass(frozen=True)
class Message:
    type: MsgType
    seq: int
    t_ns: int
    payload: np.ndarray
    ref: int = 0
    flags: int = 0
    version: int = PROTOCOL_VERSION


def now_ns() -> int:
    return time.monotonic_ns()


def encode(type: MsgType, seq: int, payload=(), ref: int = 0, flags: int = 0, t_ns: int | None = None) -> bytes:
    """One frame. payload: float32 values, or bytes already encoded (a whole number of 4-byte
    words: STATUS carries float64 values, ``status.Status.encode``)."""
    if isinstance(payload, bytes):
        if len(payload) % 4:
            raise ValueError(f"a payload of {len(payload)} bytes is not a whole number of 4-byte words")
        data = payload
    else:
        data = np.ascontiguousarray(payload, dtype="<f4").ravel().tobytes()
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(type), flags, seq, now_ns() if t_ns is None else t_ns,
                       ref, len(data) // 4, 0) + data


def decode(frame: bytes) -> Message:
    """Parse one frame; raises ProtocolError for anything malformed (never another exception)."""
    if len(frame) > VERSION_OFFSET and frame[:4] == MAGIC and frame[VERSION_OFFSET] != PROTOCOL_VERSION:
        raise VersionError(frame[VERSION_OFFSET])  # checked first: a version-1 frame is shorter
    if len(frame) < HEADER_SIZE:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, mtype, flags, seq, t_ns, ref, count, reserved = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError("bad magic")
    if reserved:
        raise ProtocolError(f"reserved header word is {reserved}, must be 0")
    try:
        kind = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"unknown message type {mtype}") from None
    if count > MAX_COUNT or len(frame) != HEADER_SIZE + 4 * count:
        raise ProtocolError(f"payload length {len(frame) - HEADER_SIZE} does not match count {count}")
    payload = np.frombuffer(frame, dtype="<f4", count=count, offset=HEADER_SIZE)
    return Message(kind, seq, t_ns, payload, ref, flags, version)
