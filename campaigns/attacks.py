"""The fuzz campaign's attacks (campaigns/fuzz.py runs them): one frame generator per attack
class on the state and control channels, what the node must count for each class, and how many
messages each class gets.

Well-formed frames come from the protocol's own encoder (``P.encode``); ``frame`` writes the
headers that P.encode never writes: another magic or version, an unknown type, a count that does
not match the payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from qsm_robot.serve import protocol as P
from qsm_robot.serve.status import SCALARS as STATUS_SCALARS

U32 = 0xFFFFFFFF
ATTACK_REFS = frozenset({0})
"""Refs of commands that answer the attacker's seq-0 states (sent with the restart flag); answers to
its other seqs (2**63 and up, one above the robot's) are noted in ``Gen.spoofed``. Protocol v2 refs
are 64 bits like seqs, so each answer names the full seq it answers; the robot's seqs start at 1."""
MARKER = np.array([0.123, -0.456, 0.789, 1.5, -2.5, 0.25, -0.75, 0.5], np.float32)
"""The race class's spoofed observation (first obs_dim values): found again in the flight record."""
RESTART = int(P.StateFlag.RESTART)
MIN_PER_CLASS = 20


# --- frames ------------------------------------------------------------------------------------
def frame(kind: int = P.MsgType.STATE, payload=(), *, magic: bytes = P.MAGIC, version: int = P.PROTOCOL_VERSION,
          count: int | None = None, reserved: int = 0) -> bytes:
    """A frame with a header that P.encode never writes: another magic or version, any int for
    the type, a count that does not match the payload (``bytes`` payloads of any length too), a
    non-zero reserved word; seq, flags and ref 0."""
    data = payload if isinstance(payload, bytes) else np.ascontiguousarray(payload, "<f4").ravel().tobytes()
    return P.HEADER.pack(magic, version, int(kind), 0, 0, P.now_ns(), 0,
                         len(data) // 4 if count is None else count, reserved) + data


class RobotView(Protocol):
    """What the generators read from the campaign's monitor of the node's commands."""

    last_ref: int
    """The robot's newest seq, as answered by the node."""
    spoofed: set[int]
    """Refs of answers to the attacker's states that look like the robot's."""


class Gen:
    """What the frame generators draw from: the seeded RNG, the dimensions, the robot's newest seq."""

    def __init__(self, rng: np.random.Generator, obs_dim: int, act_dim: int, monitor: RobotView):
        self.rng, self.obs_dim, self.act_dim, self.monitor = rng, obs_dim, act_dim, monitor
        self.spoofed = monitor.spoofed

    def spoof(self, seq: int) -> int:
        """Note the ref that the node's answer to a state with this seq will carry (not the robot's)."""
        if seq not in ATTACK_REFS:
            self.spoofed.add(seq)
        return seq

    def obs(self, n: int | None = None) -> np.ndarray:
        return self.rng.normal(0.0, 1.0, self.obs_dim if n is None else n).astype(np.float32)

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def state(self, seq: int = 0, *, t_ns: int | None = None, flags: int = 0) -> bytes:
        """A well-formed STATE with a random observation and the given header fields."""
        return P.encode(P.MsgType.STATE, seq, self.obs(), flags=flags, t_ns=t_ns)

    def with_values(self, values) -> bytes:
        """A valid STATE (restart flag, seq 0: accepted whatever came before) with some entries replaced."""
        obs = self.obs()
        k = int(self.rng.integers(1, self.obs_dim + 1))
        idx = self.rng.choice(self.obs_dim, k, replace=False)
        obs[idx] = [self.pick(values) for _ in idx]
        return P.encode(P.MsgType.STATE, 0, obs, flags=RESTART)


def _nan_values() -> list[np.float32]:
    bits = np.array([0x7FC00000, 0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0xFF800001], np.uint32)
    return list(bits.view(np.float32))


NANS = _nan_values()
INFS = [np.float32(np.inf), np.float32(-np.inf)]
HUGE = [np.float32(1e30), np.float32(-1e30), np.float32(3.4028235e38), np.float32(-3.4028235e38), np.float32(1e38)]
DENORMAL = [np.float32(1e-45), np.float32(-1e-45), np.float32(1e-40), np.float32(-1e-40), np.float32(1.1754942e-38)]


# --- the generators: the state channel -----------------------------------------------------------
def g_random_bytes(g: Gen) -> bytes:
    return g.rng.bytes(int(g.rng.integers(0, 301)))


def g_truncated(g: Gen) -> bytes:
    f = g.state()
    return f[:int(g.rng.integers(0, len(f)))]


def g_bad_magic(g: Gen) -> bytes:
    magic = g.pick([b"RMSQ", b"qsmr", b"\0\0\0\0", b"QSM\0", b"QSMS"]) if g.rng.random() < 0.5 else g.rng.bytes(4)
    return frame(P.MsgType.STATE, g.obs(), magic=magic if magic != P.MAGIC else b"XXXX")


def g_bad_version(g: Gen) -> bytes:
    """Another protocol version (1: a peer written for the previous one), counted as wrong_version."""
    other = [v for v in (0, 1, 3, 127, 128, 255, int(g.rng.integers(0, 256))) if v != P.PROTOCOL_VERSION]
    return frame(P.MsgType.STATE, g.obs(), version=g.pick(other))


def g_reserved(g: Gen) -> bytes:
    return frame(P.MsgType.STATE, g.obs(), reserved=g.pick([1, 2**31, U32, int(g.rng.integers(1, 2**32))]))


def g_unknown_type(g: Gen) -> bytes:
    return frame(g.pick([0, 8, 9, 64, 128, 255, int(g.rng.integers(8, 256))]), g.obs())


def g_count_mismatch(g: Gen) -> bytes:
    m = int(g.rng.integers(0, g.obs_dim + 4))
    wrong = [m + 1, 4096, 4097, 2**31, U32, int(g.rng.integers(0, 2**32))] + ([m - 1, 0] if m else [])
    count = g.pick([c for c in wrong if c != m])
    return frame(P.MsgType.STATE, g.obs(m), count=count)


def g_wrong_size(g: Gen) -> bytes:
    sizes = (0, 1, 2, g.obs_dim - 1, g.obs_dim + 1, g.obs_dim + 2, g.obs_dim + 8, 64, 4096)
    n = g.pick([k for k in sizes if k != g.obs_dim and k >= 0])
    return P.encode(P.MsgType.STATE, 0, g.obs(n), flags=RESTART)


def g_nan(g: Gen) -> bytes:
    return g.with_values(NANS)


def g_inf(g: Gen) -> bytes:
    return g.with_values(INFS)


def g_huge(g: Gen) -> bytes:
    return g.with_values(HUGE)


def g_denormal(g: Gen) -> bytes:
    return g.with_values(DENORMAL)


def g_replayed(g: Gen) -> bytes:
    return g.state(seq=max(0, g.monitor.last_ref - int(g.rng.integers(0, 3))))


def g_out_of_order(g: Gen) -> bytes:
    last = g.monitor.last_ref
    return g.state(seq=g.pick([max(0, last - int(g.rng.integers(3, 2000))), int(g.rng.integers(0, max(1, last)))]))


def g_race(g: Gen) -> bytes:
    return P.encode(P.MsgType.STATE, g.spoof(g.monitor.last_ref + 1), np.resize(MARKER, g.obs_dim))


def g_absurd_seq(g: Gen) -> bytes:
    return g.state(seq=g.spoof(g.pick([2**63, 2**64 - 1, 2**63 + int(g.rng.integers(1, 2**62))])))


def g_absurd_t_ns(g: Gen) -> bytes:
    now = P.now_ns()
    t = g.pick([2**63 - 1, 2**62, now + 10**15, now + 10**12, -(2**63), 0, now - 10**15])
    return g.state(t_ns=t, flags=RESTART)


def g_state_wrong_type(g: Gen) -> bytes:
    kind = g.pick([P.MsgType.COMMAND, P.MsgType.STATUS, P.MsgType.HEARTBEAT])
    n = {P.MsgType.COMMAND: g.act_dim, P.MsgType.STATUS: len(STATUS_SCALARS), P.MsgType.HEARTBEAT: 0}[kind]
    return P.encode(kind, g.monitor.last_ref + 1, g.obs(n), ref=g.monitor.last_ref)


def g_state_oversize(g: Gen) -> bytes:
    size = int(g.rng.integers(P.HEADER_SIZE + 4 * P.MAX_COUNT + 1, 1 << 20))  # above the node's MAXMSGSIZE
    pad = g.rng.bytes(size - P.HEADER_SIZE)
    variant = int(g.rng.integers(3))
    if variant == 0:
        return frame(P.MsgType.STATE, pad, count=g.obs_dim)  # header says obs_dim floats, the frame is far longer
    if variant == 1:
        return frame(P.MsgType.STATE, pad[: (len(pad) // 4) * 4])  # count matches, but above MAX_COUNT
    return g.rng.bytes(size)


def g_flood_garbage(g: Gen) -> bytes:
    return g.pick([g_random_bytes, g_truncated, g_bad_magic, g_count_mismatch])(g)


def g_flood_valid(g: Gen) -> bytes:
    return P.encode(P.MsgType.STATE, 0, g.obs() * 0.5, flags=RESTART)


# --- the generators: the control channel ---------------------------------------------------------
def g_ctl_bad_header(g: Gen) -> bytes:
    variant = int(g.rng.integers(5))
    if variant == 0:
        f = P.encode(P.MsgType.HEARTBEAT, 0, g.obs(3))
        return f[:g.pick([int(g.rng.integers(0, P.HEADER_SIZE)), int(g.rng.integers(P.HEADER_SIZE, len(f)))])]
    if variant == 1:
        return frame(P.MsgType.HEARTBEAT, magic=g.pick([b"RMSQ", b"\0\0\0\0", b"qsmr"]))
    if variant == 2:
        return frame(P.MsgType.HEARTBEAT, version=g.pick([0, 1, 255]))
    if variant == 3:
        return frame(g.pick([0, 8, 200, 255]))
    return frame(P.MsgType.HEARTBEAT, g.obs(2), count=g.pick([0, 1, 3, 4097, U32]))


def g_ctl_multipart(g: Gen) -> list[bytes]:
    return [g.pick([P.encode(P.MsgType.HEARTBEAT, 0), g_random_bytes(g), b""]) for _ in range(int(g.rng.integers(2, 5)))]


def g_ctl_wrong_type(g: Gen) -> bytes:
    kind = g.pick([P.MsgType.STATE, P.MsgType.COMMAND, P.MsgType.STATUS])
    n = {P.MsgType.STATE: g.obs_dim, P.MsgType.COMMAND: g.act_dim, P.MsgType.STATUS: len(STATUS_SCALARS)}[kind]
    payload = g.obs(n)
    return P.encode(kind, int(g.rng.integers(0, 2**32)), payload)


def g_ctl_with_payload(g: Gen) -> bytes:
    payload = g.obs(int(g.rng.integers(1, 1000)))
    payload[:: max(1, len(payload) // 3)] = g.pick(NANS + INFS + HUGE)
    return P.encode(P.MsgType.HEARTBEAT, int(g.rng.integers(1, 2**32)), payload)


def g_ctl_oversize(g: Gen) -> bytes:
    size = int(g.rng.integers(4097, 65537))
    if g.rng.random() < 0.5:  # a well-formed HEARTBEAT whose payload makes it too long
        return P.encode(P.MsgType.HEARTBEAT, 0, g.obs((size - P.HEADER_SIZE) // 4))
    return g.rng.bytes(size)


def g_heartbeat(g: Gen) -> bytes:
    return P.encode(P.MsgType.HEARTBEAT, int(g.rng.integers(1, 2**31)))


# --- expectations on the node's counters (a class's row: counter deltas and messages sent) --------
def exact_malformed(r: dict) -> bool:
    return r["d_malformed"] == r["messages"]


def exact_rejected(r: dict) -> bool:
    """Each control message dropped once: as malformed, or as another protocol version."""
    return r["d_malformed"] + r["d_wrong_version"] == r["messages"]


def some_wrong_version(r: dict) -> bool:
    return 0 < r["d_wrong_version"] <= r["messages"] and r["d_malformed"] == 0


def some_malformed(r: dict) -> bool:
    return 0 < r["d_malformed"] <= r["messages"]


def some_invalid(r: dict) -> bool:
    return r["d_state_invalid"] > 0 and r["d_malformed"] == 0


def accepted(r: dict) -> bool:
    return r["d_malformed"] == 0 and r["d_state_invalid"] == 0


def some_stale(r: dict) -> bool:
    return r["d_stale"] > 0 and r["d_malformed"] == 0


# --- the classes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attack:
    name: str
    channel: str
    """'state' or 'control'."""
    weight: float
    make: Callable[[Gen], bytes | list[bytes]]
    expect: Callable[[dict], bool]
    """Checked on the row after the class: what the node must have counted (the text says it)."""
    expect_text: str
    mode: str = "paced"
    """'paced' (bursts after every fuzz.PACED_EVERY-th command to the robot), 'sync' (one message
    right after every command to the robot), 'race' (one a period), 'flood', 'oversize' (paced, on
    a connection of its own)."""


ATTACKS = [
    Attack("s_random_bytes", "state", 8, g_random_bytes, some_malformed, "malformed>0"),
    Attack("s_truncated", "state", 4, g_truncated, some_malformed, "malformed>0"),
    Attack("s_bad_magic", "state", 3, g_bad_magic, some_malformed, "malformed>0"),
    Attack("s_bad_version", "state", 3, g_bad_version, some_wrong_version, "wrong_version>0, nothing malformed"),
    Attack("s_reserved_nonzero", "state", 2, g_reserved, some_malformed, "malformed>0"),
    Attack("s_unknown_type", "state", 3, g_unknown_type, some_malformed, "malformed>0"),
    Attack("s_count_mismatch", "state", 4, g_count_mismatch, some_malformed, "malformed>0"),
    Attack("s_wrong_size", "state", 4, g_wrong_size, some_invalid, "state_invalid>0"),
    Attack("s_nan", "state", 4, g_nan, some_invalid, "state_invalid>0"),
    Attack("s_inf", "state", 4, g_inf, some_invalid, "state_invalid>0"),
    Attack("s_huge_1e30", "state", 4, g_huge, accepted, "finite: evaluated, not invalid"),
    Attack("s_denormal", "state", 3, g_denormal, accepted, "finite: evaluated, not invalid"),
    Attack("s_replayed_seq", "state", 4, g_replayed, accepted, "dropped as replayed, nothing malformed"),
    Attack("s_out_of_order_seq", "state", 4, g_out_of_order, accepted, "dropped as replayed, nothing malformed"),
    Attack("s_seq_race_spoof", "state", 0.5, g_race, accepted, "accepted (unauthenticated)", mode="race"),
    Attack("s_absurd_seq", "state", 1, g_absurd_seq, accepted, "not malformed, not invalid: the seq check"),
    Attack("s_absurd_t_ns", "state", 1, g_absurd_t_ns, some_stale, "stale>0 (the offset is poisoned)"),
    Attack("s_wrong_type", "state", 3, g_state_wrong_type, some_malformed, "malformed>0"),
    Attack("s_oversize", "state", 0.2, g_state_oversize, accepted, "dropped by ZeroMQ (MAXMSGSIZE)", mode="oversize"),
    Attack("s_sync_garbage", "state", 1, g_random_bytes, some_malformed, "malformed>0", mode="sync"),
    Attack("c_random_bytes", "control", 4, g_random_bytes, exact_malformed, "malformed == messages"),
    Attack("c_bad_header", "control", 4, g_ctl_bad_header, exact_rejected, "malformed + wrong_version == messages"),
    Attack("c_multipart", "control", 3, g_ctl_multipart, exact_malformed, "malformed == messages"),
    Attack("c_wrong_type", "control", 3, g_ctl_wrong_type, exact_malformed, "malformed == messages"),
    Attack("c_heartbeat_payload", "control", 2, g_ctl_with_payload, exact_malformed, "malformed == messages"),
    Attack("c_oversize", "control", 0.3, g_ctl_oversize, accepted, "dropped by ZeroMQ (MAXMSGSIZE)", mode="oversize"),
    Attack("s_flood_garbage", "state", 15, g_flood_garbage, some_malformed, "malformed>0", mode="flood"),
    Attack("s_flood_valid", "state", 10, g_flood_valid, accepted, "evaluated at most 2 a period", mode="flood"),
    Attack("c_heartbeat_flood", "control", 8, g_heartbeat, accepted, "answered as HEARTBEAT", mode="flood"),
]
CLASS_NAMES = [a.name for a in ATTACKS]
FLOODS = {a.name for a in ATTACKS if a.mode == "flood"}


def allocate(total: int, attacks: list[Attack]) -> dict[str, int]:
    """Messages per class: by weight (largest remainder), at least MIN_PER_CLASS, summing to >= total."""
    weights = np.array([a.weight for a in attacks], float)
    share = total * weights / weights.sum()
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts))[: total - counts.sum()]:
        counts[i] += 1
    return {a.name: max(MIN_PER_CLASS, int(c)) for a, c in zip(attacks, counts)}
