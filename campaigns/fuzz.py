"""Fuzz campaign: malformed and adversarial messages against a running qsm-serve node.

    python campaigns/fuzz.py [--model deploy/models/cartpole-ref-k1.onnx] [--messages 100000] [--seed 0]
                             [--rate 100] [--max-delta 0.2] [--burst 16] [--shared-robot] [--work-dir DIR]

Starts ``qsm-serve run --arm`` (harness.start_serve) on the model with a profile derived from
deploy/profiles/cartpole-sim.json (private ipc:// endpoints in the work folder, no calibration
record, the rate limiter ON at 10% of the actuator range unless --max-delta says otherwise, the
control-period check off at rates other than the profile's), a legitimate robot (qsm-sim via
harness.start_sim: a fresh run for each class, or one for all with --shared-robot), and, in this
process:

* a monitor: a SUB socket on the node's command endpoint that receives every COMMAND and checks
  it: one frame of the protocol, ``act_dim`` finite values within the profile's action bounds,
  and for two consecutive commands of the node's stream (no seq missing) whose
  later one is not flagged SAFE (CommandFlag bit 1: safe-stop and e-stop commands bypass the rate
  limit by design), ``|delta| <= max_delta_per_tick + 1e-6``. A failed check is a *violation*.
  Pairs with an unexplained seq gap are not checked (their exceedances are in the totals). It
  also counts, as a finding and not a violation, commands answering the robot's consecutive seqs
  r-1 and r (what the robot applies on consecutive ticks) that differ by more than the limit
  (``robot_view_exceed``): answered attacker states interleave with the robot's and each takes a
  rate-limit step of its own.
* attackers: an XPUB with NODROP (a PUB whose send blocks instead of dropping, so every frame
  reaches the node's socket and a flood leaves no backlog behind) connected to the node's state
  endpoint (its SUB takes several publishers), and a DEALER connected to its control endpoint
  (plus a DEALER of its own for oversize frames: the node's ROUTER, MAXMSGSIZE 4096, drops that
  connection on each).

Attack classes (one table row each, ``--classes`` picks some): on the state channel random bytes,
truncated frames, wrong magic, wrong version, unknown type, count/length mismatch, wrong payload
sizes (obs_dim +- k), NaN, +-inf, +-1e30 and float32 max, denormals, replayed and out-of-order
sequence numbers, a race for the robot's next seq with a spoofed observation, absurd seq (2**63,
2**64-1, 2**63 + random), absurd t_ns (far future, far past), COMMAND/STATUS/HEARTBEAT frames,
oversize frames (16 KiB to 1 MiB), one garbage frame right after each command (s_sync_garbage),
and two floods (garbage; valid-looking states); on the control channel random bytes, bad
headers, multi-part messages, wrong types (STATE/COMMAND/STATUS), HEARTBEATs with a payload,
oversize frames and a HEARTBEAT flood. States that must be evaluated to test the safety chain
(wrong sizes, NaN, inf, 1e30, denormals, t_ns) carry the restart flag with seq 0, as any peer of
the unauthenticated state channel can. Well-formed ARM, DISARM and ESTOP are never sent by the
attacker: they are operator commands, authenticated with CURVE where the node is reachable beyond
the host (covered by tests/test_auth.py); this campaign is about what an unauthenticated peer's
bytes do. The campaign's own operator socket sends HEARTBEAT and, after a safe-stop, ARM.

Pacing: classes that are not floods send up to ``--burst`` messages right after every
PACED_EVERY-th command to the robot (or after 1.5 periods without one), spread over at least
``--min-class-s``, so that the robot's states still reach the node: its state socket conflates
(only the newest frame waits), so frames that arrive while the node is busy replace each other
inside ZeroMQ (the counter deltas show how many the node read). Floods send as fast as the node's
sockets take them for at least ``--flood-s`` (and at least their share of messages). Messages are
split over the classes by weight, at least MIN_PER_CLASS each, ``--messages`` in all (floods add
more). Seeded (``--seed``).

Measured after each class: the node process alive (a *crash*: it exited, its status says FAULT,
it stopped answering, or its summary counts internal errors), its state and counter deltas
(STATUS), the monitor's violations, the loop rate under attack (``cmds_per_s`` the node sent;
``legit_per_s`` and ``legit_frac`` of them answering the robot's states, per nominal period;
``policy_frac`` with the policy's command, neither fallback nor safe) and the node's RSS; with a
robot run per class, the robot's report (``robot_fresh``: ticks with a fresh command;
``robot_wd_ticks``: ticks on its watchdog's safe command). A safe-stop during a class is a
finding (availability, not safety): the node is re-armed; if the robot then still gets no policy
command (the node takes its states for replayed or stale), that is a finding too and only a robot
restart (its first state resets the node's stream) ends it. A baseline with no attack comes first.

At the end the node gets SIGTERM; its summary-*.json (replayed, internal errors) and flight
record (commands computed from the race class's spoofed observation) are read. Prints the tables
and totals, writes benchmarks/results/fuzz_<time>.csv (and fuzz_<time>_robot.csv), keeps the work
folder (profile, node logs, robot reports, flight record), exits 1 on a crash or a violation.
"""

from __future__ import annotations

import argparse
import bisect
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Callable

import numpy as np
import zmq
from harness import (REPO, RESULTS, ipc_endpoints, print_table, rss_kib, serve_summary, start_serve, start_sim,
                     wait_ready, write_csv)

from qsm_robot.serve import protocol as P
from qsm_robot.serve.flight_record import node_ticks
from qsm_robot.serve.profile import Profile
from qsm_robot.serve.status import SCALARS as STATUS_SCALARS
from qsm_robot.serve.status import Status

DEFAULT_MODEL = REPO / "deploy" / "models" / "cartpole-ref-k1.onnx"
BASE_PROFILE = REPO / "deploy" / "profiles" / "cartpole-sim.json"
U32 = 0xFFFFFFFF
ATTACK_REFS = frozenset({0, U32})
"""Refs of commands that answer the attacker's states: its accepted states carry seq 0 (with the
restart flag), 2**63 (ref 0) or 2**64-1 (ref 0xFFFFFFFF); the robot's seqs start at 1."""
MARKER = np.array([0.123, -0.456, 0.789, 1.5, -2.5, 0.25, -0.75, 0.5], np.float32)
"""The race class's spoofed observation (first obs_dim values): found again in the flight record."""
RESTART = int(P.StateFlag.RESTART)
NOT_POLICY = int(P.CommandFlag.FALLBACK | P.CommandFlag.SAFE)
"""COMMAND flags of a command that is not the policy's (a fallback or the node's safe command)."""
MIN_PER_CLASS = 20
PACED_EVERY = 2
"""Paced classes burst after every 2nd command to the robot (s_sync_garbage sends one frame after
every command)."""
COUNTERS = ("malformed", "state_invalid", "ticks", "stale", "fallbacks", "rate_clamped", "bounds_clamped", "misses",
            "action_invalid")
COLUMNS = ["class", "channel", "messages", "seconds", "msg_per_s", "alive", "state_after", "violations",
           "rate_checked", "cmds_per_s", "legit_per_s", "legit_frac", "policy_frac", "robot_fresh", "robot_wd_ticks",
           "d_malformed", "d_state_invalid", "d_ticks",
           "d_stale", "d_fallbacks", "d_rate_clamped", "d_misses", "robot_view_exceed", "rss_mib", "expect_ok", "notes"]
ROBOT_COLUMNS = ["run", "classes", "steps", "achieved_hz", "fresh_frac", "on_time_frac", "late", "one_tick_late",
                 "watchdog_trips", "watchdog_ticks", "rejected", "safe_from_node"]


# --- frames ------------------------------------------------------------------------------------
def frame(kind: int = P.MsgType.STATE, payload=(), *, seq: int = 0, t_ns: int | None = None, flags: int = 0,
          ref: int = 0, magic: bytes = P.MAGIC, version: int = P.PROTOCOL_VERSION, count: int | None = None) -> bytes:
    """A frame with every header field settable (P.encode checks and fixes what we want wrong)."""
    data = payload if isinstance(payload, bytes) else np.ascontiguousarray(payload, "<f4").ravel().tobytes()
    return P.HEADER.pack(magic, version, int(kind), flags, seq, P.now_ns() if t_ns is None else t_ns, ref,
                         len(data) // 4 if count is None else count) + data


class Gen:
    """What the frame generators draw from: the seeded RNG, the dimensions, the robot's newest seq."""

    def __init__(self, rng: np.random.Generator, obs_dim: int, act_dim: int, monitor: "Monitor"):
        self.rng, self.obs_dim, self.act_dim, self.monitor = rng, obs_dim, act_dim, monitor
        self.spoofed = monitor.spoofed

    def spoof(self, seq: int) -> int:
        """Note the ref that the node's answer to a state with this seq will carry (not the robot's)."""
        if seq & U32 not in ATTACK_REFS:
            self.spoofed.add(seq & U32)
        return seq

    def obs(self, n: int | None = None) -> np.ndarray:
        return self.rng.normal(0.0, 1.0, self.obs_dim if n is None else n).astype(np.float32)

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def state(self, **kw) -> bytes:
        """A well-formed STATE with a random observation and the given header fields."""
        return frame(P.MsgType.STATE, self.obs(), **kw)

    def with_values(self, values) -> bytes:
        """A valid STATE (restart flag, seq 0: accepted whatever came before) with some entries replaced."""
        obs = self.obs()
        k = int(self.rng.integers(1, self.obs_dim + 1))
        idx = self.rng.choice(self.obs_dim, k, replace=False)
        obs[idx] = [self.pick(values) for _ in idx]
        return frame(P.MsgType.STATE, obs, flags=RESTART)


def _nan_values() -> list[np.float32]:
    bits = np.array([0x7FC00000, 0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0xFF800001], np.uint32)
    return list(bits.view(np.float32))


NANS = _nan_values()
INFS = [np.float32(np.inf), np.float32(-np.inf)]
HUGE = [np.float32(1e30), np.float32(-1e30), np.float32(3.4028235e38), np.float32(-3.4028235e38), np.float32(1e38)]
DENORMAL = [np.float32(1e-45), np.float32(-1e-45), np.float32(1e-40), np.float32(-1e-40), np.float32(1.1754942e-38)]


def g_random_bytes(g: Gen) -> bytes:
    return g.rng.bytes(int(g.rng.integers(0, 301)))


def g_truncated(g: Gen) -> bytes:
    f = g.state()
    return f[:int(g.rng.integers(0, len(f)))]


def g_bad_magic(g: Gen) -> bytes:
    magic = g.pick([b"RMSQ", b"qsmr", b"\0\0\0\0", b"QSM\0", b"QSMS"]) if g.rng.random() < 0.5 else g.rng.bytes(4)
    return frame(P.MsgType.STATE, g.obs(), magic=magic if magic != P.MAGIC else b"XXXX")


def g_bad_version(g: Gen) -> bytes:
    return frame(P.MsgType.STATE, g.obs(), version=g.pick([0, 2, 3, 127, 128, 255, int(g.rng.integers(2, 256))]))


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
    return frame(P.MsgType.STATE, g.obs(n), flags=RESTART)


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
    return frame(P.MsgType.STATE, np.resize(MARKER, g.obs_dim), seq=g.spoof(g.monitor.last_ref + 1))


def g_absurd_seq(g: Gen) -> bytes:
    return g.state(seq=g.spoof(g.pick([2**63, 2**64 - 1, 2**63 + int(g.rng.integers(1, 2**62))])))


def g_absurd_t_ns(g: Gen) -> bytes:
    now = P.now_ns()
    t = g.pick([2**63 - 1, 2**62, now + 10**15, now + 10**12, -(2**63), 0, now - 10**15])
    return g.state(t_ns=t, flags=RESTART)


def g_state_wrong_type(g: Gen) -> bytes:
    kind = g.pick([P.MsgType.COMMAND, P.MsgType.STATUS, P.MsgType.HEARTBEAT])
    n = {P.MsgType.COMMAND: g.act_dim, P.MsgType.STATUS: len(STATUS_SCALARS), P.MsgType.HEARTBEAT: 0}[kind]
    return frame(kind, g.obs(n), seq=g.monitor.last_ref + 1, ref=g.monitor.last_ref)


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
    return frame(P.MsgType.STATE, g.obs() * 0.5, flags=RESTART)


def g_ctl_bad_header(g: Gen) -> bytes:
    variant = int(g.rng.integers(5))
    if variant == 0:
        f = frame(P.MsgType.HEARTBEAT, g.obs(3))
        return f[:g.pick([int(g.rng.integers(0, P.HEADER_SIZE)), int(g.rng.integers(P.HEADER_SIZE, len(f)))])]
    if variant == 1:
        return frame(P.MsgType.HEARTBEAT, magic=g.pick([b"RMSQ", b"\0\0\0\0", b"qsmr"]))
    if variant == 2:
        return frame(P.MsgType.HEARTBEAT, version=g.pick([0, 2, 255]))
    if variant == 3:
        return frame(g.pick([0, 8, 200, 255]))
    return frame(P.MsgType.HEARTBEAT, g.obs(2), count=g.pick([0, 1, 3, 4097, U32]))


def g_ctl_multipart(g: Gen) -> list[bytes]:
    parts = [g.pick([frame(P.MsgType.HEARTBEAT), g_random_bytes(g), b""]) for _ in range(int(g.rng.integers(2, 5)))]
    return parts


def g_ctl_wrong_type(g: Gen) -> bytes:
    kind = g.pick([P.MsgType.STATE, P.MsgType.COMMAND, P.MsgType.STATUS])
    n = {P.MsgType.STATE: g.obs_dim, P.MsgType.COMMAND: g.act_dim, P.MsgType.STATUS: len(STATUS_SCALARS)}[kind]
    return frame(kind, g.obs(n), seq=int(g.rng.integers(0, 2**32)))


def g_ctl_with_payload(g: Gen) -> bytes:
    payload = g.obs(int(g.rng.integers(1, 1000)))
    payload[:: max(1, len(payload) // 3)] = g.pick(NANS + INFS + HUGE)
    return frame(P.MsgType.HEARTBEAT, payload, seq=int(g.rng.integers(1, 2**32)))


def g_ctl_oversize(g: Gen) -> bytes:
    size = int(g.rng.integers(4097, 65537))
    if g.rng.random() < 0.5:  # a well-formed HEARTBEAT whose payload makes it too long
        return frame(P.MsgType.HEARTBEAT, g.obs((size - P.HEADER_SIZE) // 4))
    return g.rng.bytes(size)


def g_heartbeat(g: Gen) -> bytes:
    return frame(P.MsgType.HEARTBEAT, seq=int(g.rng.integers(1, 2**31)))


# --- expectations on the node's counters --------------------------------------------------------
def exact_malformed(r: dict) -> bool:
    return r["d_malformed"] == r["messages"]


def some_malformed(r: dict) -> bool:
    return 0 < r["d_malformed"] <= r["messages"]


def some_invalid(r: dict) -> bool:
    return r["d_state_invalid"] > 0 and r["d_malformed"] == 0


def accepted(r: dict) -> bool:
    return r["d_malformed"] == 0 and r["d_state_invalid"] == 0


def some_stale(r: dict) -> bool:
    return r["d_stale"] > 0 and r["d_malformed"] == 0


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
    """'paced' (bursts after every PACED_EVERY-th command to the robot), 'sync' (one message right
    after every command to the robot), 'race' (one a period), 'flood', 'oversize' (paced, on a
    connection of its own)."""


ATTACKS = [
    Attack("s_random_bytes", "state", 8, g_random_bytes, some_malformed, "malformed>0"),
    Attack("s_truncated", "state", 4, g_truncated, some_malformed, "malformed>0"),
    Attack("s_bad_magic", "state", 3, g_bad_magic, some_malformed, "malformed>0"),
    Attack("s_bad_version", "state", 3, g_bad_version, some_malformed, "malformed>0"),
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
    Attack("c_bad_header", "control", 4, g_ctl_bad_header, exact_malformed, "malformed == messages"),
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


# --- the monitor ---------------------------------------------------------------------------------
class Monitor(threading.Thread):
    """Receives every COMMAND the node publishes; checks frames and bounds as they come, rates later."""

    def __init__(self, ctx: zmq.Context, endpoint: str, low, high):
        super().__init__(name="fuzz-monitor", daemon=True)
        self.low, self.high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)  # never drop: the rate check needs every command
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.cmds: list[tuple] = []
        """(node t_ns, seq, ref, flags, values) per command, in arrival order."""
        self.bad: list[tuple[int, str]] = []
        """(node t_ns or 0, reason) per command that failed the frame, size, finite or bounds check."""
        self.cond = threading.Condition()
        self.triggers = 0
        self.last_ref = 0
        """The robot's newest seq, as answered by the node (reset when a robot run starts)."""
        self.spoofed: set[int] = set()
        """Refs of answers to the attacker's states that look like the robot's (race, absurd seq)."""
        self._halt = False

    def stop(self) -> None:
        self._halt = True
        self.join(timeout=2.0)
        self.sock.close(0)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._halt:
            if not poller.poll(20):
                continue
            while True:
                try:
                    raw = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._take(raw)

    def _take(self, raw: bytes) -> None:
        try:
            msg = P.decode(raw)
        except P.ProtocolError as exc:
            self.bad.append((P.now_ns(), f"undecodable command frame: {exc}"))
            return
        if msg.type != P.MsgType.COMMAND:
            self.bad.append((msg.t_ns, f"{msg.type.name} on the command channel"))
            return
        c = msg.payload.astype(np.float64)
        if c.shape != self.low.shape:
            self.bad.append((msg.t_ns, f"command of {c.size} values (seq {msg.seq})"))
        elif not np.isfinite(c).all():
            self.bad.append((msg.t_ns, f"non-finite command {c.tolist()} (seq {msg.seq})"))
        elif ((c < self.low) | (c > self.high)).any():
            self.bad.append((msg.t_ns, f"command {c.tolist()} outside [{self.low.tolist()}, {self.high.tolist()}] "
                                       f"(seq {msg.seq})"))
        self.cmds.append((msg.t_ns, msg.seq, msg.ref, msg.flags, c))
        # The robot's seqs grow by one a period: a far jump is the answer to a forged seq.
        if msg.ref not in ATTACK_REFS and (self.last_ref == 0 or msg.ref <= self.last_ref + 1000):
            with self.cond:
                self.last_ref = max(self.last_ref, msg.ref)
                self.triggers += 1
                self.cond.notify_all()

    def wait_trigger(self, seen: int, timeout_s: float) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.triggers != seen, timeout=timeout_s)
            return self.triggers

    def policy_commands_since(self, t_ns: int, exclude: set) -> int:
        """Commands after t_ns that answer the robot with the policy's action (no fallback, not safe)."""
        n = 0
        for t, _, ref, flags, _ in reversed(self.cmds[-5000:]):
            if t <= t_ns:
                break
            n += (flags & NOT_POLICY) == 0 and ref not in ATTACK_REFS and ref not in exclude
        return n

    def wait_policy(self, n: int, since_ns: int, timeout_s: float, exclude: set) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.policy_commands_since(since_ns, exclude) >= n:
                return True
            time.sleep(0.02)
        return False


class RateCheck:
    """The rate-limit checks over the command stream, run on the commands received since the last call."""

    def __init__(self, max_delta):
        self.max_delta = None if max_delta is None else np.asarray(max_delta, np.float64) + 1e-6
        self.prev = None
        self.by_ref: dict[tuple[int, int], tuple] = {}
        self.done = 0
        self.robot_starts: list[int] = []
        """Start time of each robot run: its seqs start again at 1."""

    def robot_run(self, t_ns: int) -> int:
        return bisect.bisect_right(self.robot_starts, t_ns)

    def run(self, cmds: list[tuple]) -> dict:
        out = dict(rate_viol=0, rate_checked=0, rate_unverified=0, rate_unverified_exceed=0, robot_view_exceed=0,
                   examples=[], robot_view_examples=[])
        new = cmds[self.done:]
        self.done += len(new)
        if self.max_delta is None:
            return out
        for cmd in new:
            t, seq, ref, flags, c = cmd
            if self.prev is not None and seq <= self.prev[1]:
                self.prev = None  # a restarted node counts from 1 again
            if self.prev is not None and not flags & int(P.CommandFlag.SAFE):
                pseq, pc = self.prev[1], self.prev[4]
                exceed = c.shape == pc.shape and bool((np.abs(c - pc) > self.max_delta).any())
                if seq == pseq + 1:  # none dropped between them
                    out["rate_checked"] += 1
                    if exceed:
                        out["rate_viol"] += 1
                        out["examples"].append(f"seq {pseq}->{seq}: {pc.tolist()} -> {c.tolist()}")
                else:
                    out["rate_unverified"] += 1
                    out["rate_unverified_exceed"] += exceed
            self.prev = cmd
            if ref in ATTACK_REFS or ref >= 2**31:
                continue
            run = self.robot_run(t)
            before = self.by_ref.get((run, ref - 1))
            if before is not None and not flags & int(P.CommandFlag.SAFE) and before[4].shape == c.shape:
                if (np.abs(c - before[4]) > self.max_delta).any():
                    out["robot_view_exceed"] += 1
                    out["robot_view_examples"].append(f"ref {ref - 1}->{ref}: {before[4].tolist()} -> {c.tolist()}")
            self.by_ref[(run, ref)] = cmd
            if len(self.by_ref) > 4096:
                for k in sorted(self.by_ref)[:2048]:
                    del self.by_ref[k]
        return out


# --- sockets and processes -------------------------------------------------------------------------
class Dealer:
    """A DEALER on the control channel that counts the STATUS replies it gets."""

    def __init__(self, ctx: zmq.Context, endpoint: str, opts: dict | None = None):
        self.sock = ctx.socket(zmq.DEALER)
        for opt, value in {zmq.LINGER: 0, zmq.RCVHWM: 0, zmq.SNDTIMEO: 2000, **(opts or {})}.items():
            self.sock.setsockopt(opt, value)
        self.sock.connect(endpoint)
        self.replies = 0
        self.seq = 10**9  # our own requests; the attacker's frames carry other seqs

    def _take(self, raw: bytes) -> P.Message | None:
        try:
            msg = P.decode(raw)
        except P.ProtocolError:
            return None
        if msg.type == P.MsgType.STATUS:
            self.replies += 1
        return msg

    def drain(self) -> None:
        while True:
            try:
                self._take(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    def request(self, kind: P.MsgType, timeout_s: float = 2.0) -> dict:
        """Send one control message and return the STATUS that answers it (TimeoutError if none)."""
        self.seq += 1
        self.sock.send(P.encode(kind, self.seq))
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(max(1, int(left * 1000))):
                break
            msg = self._take(self.sock.recv())
            if msg is not None and msg.type == P.MsgType.STATUS and msg.ref == self.seq & U32:
                return Status.decode(msg.payload).to_dict()
        raise TimeoutError(f"no STATUS reply to {kind.name} within {timeout_s} s")

    def close(self) -> None:
        self.sock.close(0)


def _drain_pipe(pipe, lines: list) -> None:
    for line in pipe:
        lines.append((time.monotonic_ns(), line.rstrip("\n")))


class Node:
    """qsm-serve as a child process, its stdout and stderr read on threads (a full pipe would stall it)."""

    def __init__(self, model: Path, profile_path: Path, record_dir: Path, control: str):
        self.proc = start_serve(model, profile_path, record_dir)
        wait_ready(control, self.proc, timeout_s=120)
        self.lines: list[tuple[int, str]] = []
        self.threads = [threading.Thread(target=_drain_pipe, args=(p, self.lines), daemon=True)
                        for p in (self.proc.stdout, self.proc.stderr)]
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def transitions(self, since_ns: int, until_ns: int) -> list[str]:
        """The node's state changes logged in that time ('RUNNING -> SAFE_STOP: reason')."""
        return [line.split("qsm-serve: ", 1)[1] for t, line in list(self.lines)
                if since_ns <= t <= until_ns and " -> " in line and line.startswith("qsm-serve: ")]

    def stop(self) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self.threads:
            t.join(timeout=5)
        return self.proc.returncode


class Robot:
    """qsm-sim runs, one after another; each leaves its RobotReport."""

    def __init__(self, profile_path: Path, scenario_path: Path, work: Path):
        self.profile_path, self.scenario_path, self.work = profile_path, scenario_path, work
        self.proc: subprocess.Popen | None = None
        self.runs: list[dict] = []
        self.label = ""
        self.classes: list[str] = []

    def start(self, label: str) -> None:
        self.label, self.classes = label, []
        self.results = self.work / f"robot-{len(self.runs) + 1}.json"
        self.proc = start_sim(self.profile_path, self.scenario_path, self.results, quiet=True)

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        report = json.loads(self.results.read_text()) if self.results.is_file() else {}
        steps = report.get("steps", 0)
        applied, one_late = report.get("commands_applied", 0), report.get("commands_one_tick_late", 0)
        run = {"run": self.label, "classes": " ".join(self.classes) or "-", "steps": steps,
               "achieved_hz": round(report.get("achieved_rate_hz", 0.0), 2),
               "fresh_frac": round(applied / steps, 4) if steps else None,
               "on_time_frac": round((applied - one_late) / steps, 4) if steps else None,
               "late": report.get("commands_late"), "one_tick_late": one_late,
               "watchdog_trips": report.get("watchdog_trips"), "watchdog_ticks": report.get("watchdog_ticks"),
               "rejected": report.get("commands_rejected"), "safe_from_node": report.get("safe_commands_from_node")}
        if "watchdog_clear_t_ns" in report:  # trips not followed by fresh commands again before the run ended
            run["_wd_open"] = report["watchdog_trips"] - len(report["watchdog_clear_t_ns"])
        self.runs.append(run)
        return run


# --- the campaign ---------------------------------------------------------------------------------
def build_profile(rate_hz: float, endpoints: dict, max_delta: float | None) -> dict:
    """cartpole-sim.json with private endpoints, the given rate, no calibration, the rate limiter on."""
    data = json.loads(BASE_PROFILE.read_text())
    names = {f.name for f in dc_fields(Profile)}
    period_ms = 1e3 / rate_hz
    data.update(name=f"fuzz-{rate_hz:g}hz", rate_hz=rate_hz, endpoints=endpoints)
    if rate_hz != Profile.load(BASE_PROFILE).rate_hz:
        data["check_control_period"] = False
    data["latency_budget_ms"] = min(float(data.get("latency_budget_ms", 2.0)), 0.5 * period_ms)
    if "require_calibration" in names:
        data["require_calibration"] = False
    data.pop("curve", None)
    span = np.array(data["policy"]["action_high"], float) - np.array(data["policy"]["action_low"], float)
    if max_delta is None:
        data["max_delta_per_tick"] = data.get("max_delta_per_tick") or [round(float(x), 6) for x in 0.1 * span]
    else:
        data["max_delta_per_tick"] = [float(max_delta)] * len(span) if max_delta > 0 else None
    return data


def run_campaign(model: str | Path, work_dir: str | Path, messages: int = 100_000, seed: int = 0,
                 rate_hz: float = 100.0, *, max_delta: float | None = None, burst: int = 16,
                 baseline_s: float = 3.0, flood_s: float = 1.0, classes: list[str] | None = None,
                 robot_per_class: bool = True, min_class_s: float = 1.0,
                 log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Run the campaign; returns {"rows": one per class (baseline first), "robot": the robot's runs,
    "summary": the node's summary JSON, "totals": {...}, "profile": the profile used}.

    robot_per_class: a fresh robot run for each class (its report is the class's ``robot_fresh``
    and ``robot_wd_ticks``; about 1.5 s more a class), else one run for all of them, restarted
    only when the node no longer serves it."""
    model, work = Path(model), Path(work_dir)
    if not model.is_file():
        raise FileNotFoundError(f"model {model} does not exist")
    work.mkdir(parents=True, exist_ok=True)
    sock_dir = work if len(str(work)) < 80 else Path(tempfile.mkdtemp(prefix="qsm-fuzz-"))
    endpoints = ipc_endpoints(sock_dir)
    prof = build_profile(rate_hz, endpoints, max_delta)
    profile_path, scenario_path = work / "profile.json", work / "scenario.json"
    profile_path.write_text(json.dumps(prof, indent=2))
    scenario_path.write_text(json.dumps({"name": "fuzz-robot", "seed": seed, "episodes": 100_000, "faults": {}}))
    profile = Profile.load(profile_path)
    attacks = [a for a in ATTACKS if classes is None or a.name in classes]
    unknown = set(classes or ()) - set(CLASS_NAMES)
    if unknown:
        raise ValueError(f"unknown attack classes {sorted(unknown)}; known: {CLASS_NAMES}")
    counts = allocate(messages, attacks)
    period_s = 1.0 / profile.rate_hz
    record_dir = work / "rec"
    rng = np.random.default_rng(seed)

    ctx = zmq.Context()
    rows: list[dict] = []
    log(f"fuzz: starting qsm-serve on {model} ({profile.rate_hz:g} Hz, max_delta_per_tick "
        f"{profile.max_delta_per_tick}) in {work}")
    node = Node(model, profile_path, record_dir, endpoints["control"])
    nodes = [node]
    monitor = Monitor(ctx, endpoints["command"], profile.action_low, profile.action_high)
    monitor.start()
    spoofed = monitor.spoofed
    rates = RateCheck(profile.max_delta_per_tick)
    operator = Dealer(ctx, endpoints["control"])
    attacker = Dealer(ctx, endpoints["control"])
    # An XPUB with NODROP is a PUB whose send blocks (up to SNDTIMEO) instead of dropping at the
    # high-water mark: every frame sent reaches the node's socket, and a flood runs at the rate
    # the node's socket takes frames, with no backlog left over after the class.
    pub = ctx.socket(zmq.XPUB)
    for opt, value in {zmq.LINGER: 0, zmq.SNDHWM: 1000, zmq.XPUB_NODROP: 1, zmq.SNDTIMEO: 2000}.items():
        pub.setsockopt(opt, value)
    pub.connect(endpoints["state"])
    robot = Robot(profile_path, scenario_path, work)
    gen = Gen(rng, profile.obs_dim, profile.act_dim, monitor)

    def status(timeout_s: float = 5.0) -> dict | None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                return operator.request(P.MsgType.HEARTBEAT, timeout_s=1.0)
            except TimeoutError:
                if not node.alive():
                    return None
        return None

    def window(t0: int, t1: int) -> dict:
        cmds = [c for c in monitor.cmds[-50_000:] if t0 <= c[0] <= t1]
        legit = [c for c in cmds if c[2] not in ATTACK_REFS and c[2] not in spoofed]
        policy = sum(1 for c in legit if c[3] & NOT_POLICY == 0)
        secs, nominal = max(1e-9, (t1 - t0) / 1e9), max(1e-9, (t1 - t0) / 1e9 * profile.rate_hz)
        return {"cmds_per_s": round(len(cmds) / secs, 1), "legit_per_s": round(len(legit) / secs, 1),
                "legit_frac": round(len(legit) / nominal, 3), "policy_frac": round(policy / nominal, 3)}

    bad_done = [0]

    def bounds_violations() -> list[str]:
        """The monitor's frame, size, finite and bounds failures not reported yet."""
        new = monitor.bad[bad_done[0]:]
        bad_done[0] += len(new)
        return [why for _, why in new]

    def wait_loop(n: int, timeout_s: float) -> tuple[bool, int]:
        """Until the robot gets n policy commands: (it did, times the node was re-armed from SAFE_STOP)."""
        since, end, rearmed = P.now_ns(), time.monotonic() + timeout_s, 0
        while time.monotonic() < end:
            if monitor.wait_policy(n, since, timeout_s=0.25, exclude=spoofed):
                return True, rearmed
            s = status()
            if s is not None and s["node_state"] == "SAFE_STOP":
                operator.request(P.MsgType.ARM)
                rearmed += 1
        return False, rearmed

    def start_robot(label: str, timeout_s: float = 30.0) -> bool:
        """Start a robot run; re-arm the node if it safe-stopped while no robot ran (that is expected)."""
        rates.robot_starts.append(P.now_ns())
        monitor.last_ref = 0
        spoofed.clear()
        robot.start(label)
        return wait_loop(10, timeout_s)[0]

    def send_state(f) -> None:
        pub.send(f)

    def send_control(f, sock: zmq.Socket) -> None:
        (sock.send_multipart if isinstance(f, list) else sock.send)(f)

    try:
        # --- baseline: the robot alone -------------------------------------------------------
        if not start_robot("baseline"):
            raise RuntimeError("the robot got no policy command within 30 s of its start: the loop does not run")
        before = status()
        t0 = P.now_ns()
        time.sleep(baseline_s)
        t1 = P.now_ns()
        after = status()
        rate = rates.run(monitor.cmds)
        viol = bounds_violations()
        rows.append({"class": "baseline", "channel": "-", "messages": 0, "seconds": round((t1 - t0) / 1e9, 2),
                     "msg_per_s": 0, "alive": node.alive(), "state_after": after["node_state"] if after else "NO REPLY",
                     "violations": len(viol) + rate["rate_viol"], "rate_checked": rate["rate_checked"],
                     **window(t0, t1),
                     **{f"d_{k}": int(after[k] - before[k]) for k in COUNTERS if after and before},
                     "robot_view_exceed": rate["robot_view_exceed"], "rss_mib": round(rss_kib(node.proc.pid) / 1024, 1),
                     "expect_ok": True, "notes": "; ".join(viol[:2] + rate["examples"][:2]),
                     "_unverified_exceed": rate["rate_unverified_exceed"]})
        robot.classes.append("baseline")
        base_run = robot.stop()
        rows[-1].update(robot_fresh=base_run["fresh_frac"], robot_wd_ticks=base_run["watchdog_ticks"])
        if not robot_per_class and not start_robot("under attack"):
            raise RuntimeError("the robot got no policy command within 30 s of its restart")

        # --- the attack classes ---------------------------------------------------------------
        for attack in attacks:
            n = counts[attack.name]
            notes: list[str] = []
            if robot_per_class and not start_robot(attack.name):
                raise RuntimeError(f"the robot got no policy command within 30 s of its start before {attack.name}")
            robot.classes.append(attack.name)
            before = status()
            if before is None:
                raise RuntimeError(f"the node does not answer before {attack.name}")
            log(f"fuzz: {attack.name}: {n} messages ({attack.mode}) on the {attack.channel} channel")
            replies0 = attacker.replies
            big = big_pub = None
            if attack.mode == "oversize" and attack.channel == "control":
                big = Dealer(ctx, endpoints["control"], {zmq.RECONNECT_IVL: 5})
            if attack.mode == "oversize" and attack.channel == "state":
                # A connection of its own: ZeroMQ closes the connection that sent an oversize frame.
                big_pub = ctx.socket(zmq.PUB)
                big_pub.setsockopt(zmq.LINGER, 0)
                big_pub.setsockopt(zmq.RECONNECT_IVL, 5)
                big_pub.connect(endpoints["state"])
                time.sleep(0.1)
            sock = big.sock if big else attacker.sock
            send = (big_pub.send if big_pub is not None else send_state) if attack.channel == "state" else (
                lambda f: send_control(f, sock))
            sent = 0
            t0 = P.now_ns()
            try:
                if attack.mode == "flood":
                    pool = [attack.make(gen) for _ in range(min(n, 1024))]
                    end_ns = t0 + int(flood_s * 1e9)
                    while sent < n or P.now_ns() < end_ns:
                        send(pool[sent % len(pool)])
                        sent += 1
                        if attack.channel == "control" and sent % 64 == 0:
                            attacker.drain()
                else:
                    # A burst after every `every`-th command to the robot (or 1.5 periods without one),
                    # k messages a burst, spread over at least min_class_s: a loop rate needs periods.
                    every = 1 if attack.mode in ("race", "sync") else PACED_EVERY
                    bursts = max(1, int(min_class_s * profile.rate_hz / every))
                    k = 1 if attack.mode in ("race", "sync") else min(burst, max(1, -(-n // bursts)))
                    seen, last_send, count = monitor.triggers, 0.0, 0
                    while sent < n:
                        new = monitor.wait_trigger(seen, 1.5 * period_s)
                        count, seen = (count + new - seen if new != seen else every), new
                        if count < every:
                            continue
                        count = 0
                        if attack.mode == "race":
                            if time.monotonic() - last_send < 0.9 * period_s:
                                continue
                            last_send = time.monotonic()
                        for _ in range(min(k, n - sent)):
                            send(attack.make(gen))
                            sent += 1
                        if attack.channel == "control":
                            attacker.drain()
            except zmq.Again:
                notes.append(f"FINDING send blocked for 2 s after {sent} messages (the node's socket took no more)")
            t1 = P.now_ns()
            if big is not None:
                big.close()
            if big_pub is not None:
                big_pub.close(0)
            time.sleep(max(0.05, 5 * period_s))  # the conflated last frame is evaluated at most half a period later
            attacker.drain()
            replies = attacker.replies - replies0
            if attack.channel == "control":
                try:  # a barrier: the node has read everything this socket sent before
                    attacker.request(P.MsgType.HEARTBEAT, timeout_s=10.0)
                except TimeoutError:
                    notes.append("no reply on the attacker's connection after the class")
            after = status()
            alive = node.alive() and after is not None and after["node_state"] != "FAULT"
            rss = round(rss_kib(node.proc.pid) / 1024, 1) if node.alive() else None
            row = {"class": attack.name, "channel": attack.channel, "messages": sent,
                   "seconds": round((t1 - t0) / 1e9, 2), "msg_per_s": round(sent / max(1e-9, (t1 - t0) / 1e9)),
                   "alive": alive,
                   "state_after": after["node_state"] if after else ("EXITED" if not node.alive() else "NO REPLY"),
                   **window(t0, t1)}
            if after is not None:
                row.update({f"d_{k}": int(after[k] - before[k]) for k in COUNTERS})
            if attack.channel == "control":
                notes.append(f"{replies} STATUS replies")
            # --- recover for the next class -----------------------------------------------------
            if not alive:
                notes.append("CRASH: " + ("process exited" if not node.alive() else
                                          "FAULT" if after and after["node_state"] == "FAULT" else "no status reply"))
                log(f"fuzz: {attack.name}: the node crashed; restarting it")
                node.stop()
                node = Node(model, profile_path, record_dir, endpoints["control"])
                nodes.append(node)
            ok, rearmed = wait_loop(5, max(1.0, 100 * period_s))
            if rearmed:
                notes.append(f"re-armed {rearmed}x after SAFE_STOP")
            if not ok:
                notes.append(f"FINDING the robot got no policy command within {max(1.0, 100 * period_s):g} s after "
                             "the class (the node takes its states for replayed or stale): only a robot restart "
                             "(its first state resets the node's stream) ends this")
            t_end = P.now_ns()
            if robot_per_class:
                run = robot.stop()
                row.update(robot_fresh=run["fresh_frac"], robot_wd_ticks=run["watchdog_ticks"])
                if run["watchdog_trips"]:
                    notes.append(f"robot watchdog: {run['watchdog_trips']} trip(s), {run['watchdog_ticks']} of "
                                 f"{run['steps']} ticks on its safe command")
                if run.get("_wd_open"):
                    notes.append("FINDING the robot was still on its watchdog when its run ended, though the node "
                                 "answered its states with policy commands after the class")
            elif not ok:
                robot.stop()
                if not start_robot(f"restarted after {attack.name}"):
                    notes.append("FINDING no recovery even after the robot restarted")
            for tr in dict.fromkeys(node.transitions(t0, t_end)):
                if tr.split(":", 1)[0].rsplit("-> ", 1)[-1] in ("SAFE_STOP", "FAULT"):
                    notes.insert(0, f"FINDING {tr}")
            rate = rates.run(monitor.cmds)
            viol = bounds_violations()
            row.update(violations=len(viol) + rate["rate_viol"], rate_checked=rate["rate_checked"],
                       robot_view_exceed=rate["robot_view_exceed"], rss_mib=rss,
                       _unverified_exceed=rate["rate_unverified_exceed"])
            notes += viol[:3] + rate["examples"][:3]
            if rate["robot_view_exceed"]:
                notes.append("FINDING commands answering the robot's consecutive seqs differ by more than "
                             f"max_delta_per_tick, e.g. {rate['robot_view_examples'][0]}")
            row["expect_ok"] = after is not None and attack.expect(row)
            if not row["expect_ok"]:
                notes.append(f"expected {attack.expect_text}")
            row["notes"] = "; ".join(notes)
            rows.append(row)
            log(f"fuzz: {attack.name}: alive {alive}, {row['state_after']}, violations {row['violations']}, "
                f"legit {row['legit_frac']}, malformed +{row.get('d_malformed')}, invalid +{row.get('d_state_invalid')}"
                f"{'; ' + row['notes'] if row['notes'] else ''}")
    finally:
        robot.stop()
        codes = [nd.stop() for nd in nodes]
        time.sleep(0.2)
        final = rates.run(monitor.cmds)
        monitor.stop()
        for s in (operator, attacker):
            s.close()
        pub.close(0)
        ctx.term()
        for nd in nodes:
            if nd.proc.returncode is None:
                nd.proc.kill()

    for i, nd in enumerate(nodes):
        (work / f"serve-{i + 1}.log").write_text("\n".join(line for _, line in nd.lines) + "\n")
    summaries = [serve_summary(p) for p in sorted(record_dir.glob("summary-*.json"))]
    summary = summaries[-1] if summaries else {}
    internal_errors = sum(s.get("internal_errors", 0) for s in summaries)
    spoofed_answered = 0
    flights = sorted(record_dir.glob("flight-*.mcap"))
    if flights:
        ticks = node_ticks(flights[-1])
        marker = np.resize(MARKER, profile.obs_dim)
        spoofed_answered = int((ticks["obs"] == marker).all(axis=1).sum())
    for r in rows:
        if r["class"] == "s_seq_race_spoof":
            found = (f"FINDING {spoofed_answered} commands computed from the spoofed observation answered the robot's "
                     "seqs (flight record)")
            r["notes"] = "; ".join(filter(None, [r["notes"], found]))
    late_viol = len(bounds_violations()) + final["rate_viol"]
    crash_rows = sum(not r["alive"] for r in rows)  # each restarted the node; the last node must exit 0
    crashes = crash_rows + (codes[-1] != 0) + (internal_errors > 0 and crash_rows == 0)
    violations = sum(r["violations"] for r in rows) + late_viol
    attack_rows = [r for r in rows if r["class"] != "baseline"]
    totals = {
        "messages": sum(r["messages"] for r in rows), "classes": len(attack_rows), "crashes": crashes,
        "flood_messages": sum(r["messages"] for r in rows if r["class"] in FLOODS),
        "violations": violations, "rate_checked": sum(r["rate_checked"] for r in rows) + final["rate_checked"],
        "rate_unverified_exceed": sum(r["_unverified_exceed"] for r in rows) + final["rate_unverified_exceed"],
        "robot_view_exceed": sum(r["robot_view_exceed"] for r in rows) + final["robot_view_exceed"],
        "expect_failed": [r["class"] for r in rows if not r["expect_ok"]],
        "internal_errors": internal_errors, "exit_codes": codes, "replayed": summary.get("replayed"),
        "safe_stops": summary.get("safe_stops"), "spoofed_answered": spoofed_answered,
        "classes_with_safe_stop": [r["class"] for r in rows if "-> SAFE_STOP" in r.get("notes", "")],
        "resyncs": summary.get("resyncs"), "clock_jumps": summary.get("clock_jumps"),
        "baseline_legit_frac": rows[0]["legit_frac"] if rows else None,
        "min_legit_frac": min((r["legit_frac"] for r in attack_rows), default=None),
        "baseline_policy_frac": rows[0]["policy_frac"] if rows else None,
        "min_policy_frac": min((r["policy_frac"] for r in attack_rows), default=None),
        "final_state": summary.get("final_state"),
    }
    for r in rows:
        r.pop("_unverified_exceed", None)
    for r in robot.runs:
        r.pop("_wd_open", None)
    return {"rows": rows, "robot": robot.runs, "summary": summary, "totals": totals, "profile": prof}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX policy (default: %(default)s)")
    p.add_argument("--messages", type=int, default=100_000, help="messages in all, split over the classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=100.0, help="control rate of the node and the robot (Hz)")
    p.add_argument("--max-delta", type=float, help="max_delta_per_tick for every actuator (0: rate limiter off; "
                                                     "default: the profile's, else 10%% of the range)")
    p.add_argument("--burst", type=int, default=16, help="messages sent right after each of the robot's commands")
    p.add_argument("--baseline-s", type=float, default=3.0, help="seconds of the no-attack baseline")
    p.add_argument("--flood-s", type=float, default=1.0, help="a flood lasts at least this long")
    p.add_argument("--min-class-s", type=float, default=1.0,
                   help="other classes spread their messages over at least this long (at most --burst a period)")
    p.add_argument("--classes", nargs="+", choices=CLASS_NAMES, metavar="CLASS", help="run only these classes")
    p.add_argument("--shared-robot", action="store_true",
                   help="one robot run for all classes (faster; no per-class robot report)")
    p.add_argument("--work-dir", type=Path, help="profile, sockets, robot reports, flight record (default: a temp dir)")
    a = p.parse_args(argv)
    if not a.model.is_file():
        print(f"fuzz: error: model {a.model} does not exist: export one (qsm-export) or pass --model", file=sys.stderr)
        return 2
    if a.messages < 1 or a.burst < 1 or not 1 <= a.rate <= 1000:
        print("fuzz: error: --messages and --burst must be >= 1, --rate in [1, 1000] (the profile's range)", file=sys.stderr)
        return 2
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="qsm-fuzz-"))
    result = run_campaign(a.model, work, a.messages, a.seed, a.rate, max_delta=a.max_delta, burst=a.burst,
                          baseline_s=a.baseline_s, flood_s=a.flood_s, classes=a.classes,
                          robot_per_class=not a.shared_robot, min_class_s=a.min_class_s)
    rows, t = result["rows"], result["totals"]
    print(f"## qsm-serve fuzz campaign: {a.model.name}, {a.rate:g} Hz, max_delta_per_tick "
          f"{result['profile']['max_delta_per_tick']}, seed {a.seed}\n")
    print_table(rows, COLUMNS)
    print("\n## the robot (qsm-sim reports)\n")
    print_table(result["robot"], ROBOT_COLUMNS)
    print(f"\nTOTAL {t['messages']} messages ({t['flood_messages']} of them in floods) in {t['classes']} classes: "
          f"crashes {t['crashes']}, violations {t['violations']} (rate pairs checked {t['rate_checked']}; pairs "
          f"with an unexplained seq gap over the limit {t['rate_unverified_exceed']}); internal errors "
          f"{t['internal_errors']}, node exit codes {t['exit_codes']}, counter expectations failed "
          f"{t['expect_failed'] or 'none'}")
    print(f"loop rate: the robot's states answered {t['baseline_legit_frac']} per period at baseline "
          f"({t['baseline_policy_frac']} with the policy's command), {t['min_legit_frac']} "
          f"({t['min_policy_frac']}) in the worst class")
    print(f"findings: safe-stops in {t['classes_with_safe_stop'] or 'no class'}; commands over the limit on the "
          f"robot's consecutive seqs {t['robot_view_exceed']}; commands computed from spoofed observations that "
          f"answered the robot's seqs {t['spoofed_answered']}; node counted replayed {t['replayed']}, safe-stops "
          f"{t['safe_stops']} (one per robot run change is expected), resyncs {t['resyncs']}, clock jumps "
          f"{t['clock_jumps']}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"fuzz_{stamp}.csv"
    ordered = [{**{c: r.get(c) for c in COLUMNS}, **r} for r in rows]  # the table's columns first
    write_csv(out, ordered + [{"class": "TOTAL", **{k: v for k, v in t.items() if not isinstance(v, list)}}])
    write_csv(RESULTS / f"fuzz_{stamp}_robot.csv", result["robot"])
    print(f"\nwrote {out} and {out.with_name(f'fuzz_{stamp}_robot.csv')}; work folder {work}")
    return 1 if t["crashes"] or t["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
