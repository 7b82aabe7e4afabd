"""STATUS: what the node reports on the control channel, as one typed structure with its wire
encoding (docs/PROTOCOL.md, "STATUS payload", is generated from it and checked by a test).

Imports only the standard library, numpy and ``protocol``: an operator's laptop reads a node's
status without onnxruntime.

Wire: the payload of a STATUS frame is little-endian float64 values (so ``count``, which counts
4-byte words, is twice their number): the scalar fields below in this order, then the vector
fields (``act_dim``, ``obs_dim`` and ``obs_dim`` values). Every counter is an integer below 2**53,
so it survives the round trip exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from qsm_robot.serve.protocol import NodeState, ProtocolError

WIRE_DTYPE = "<f8"
RT_STATES = {0: "off", 1: "applied", -1: "refused"}
"""A real-time setting's code in STATUS (``serve/realtime.py``), by name in ``Status.to_dict``."""


def _doc(text: str, size: str = "1"):
    return field(metadata={"doc": text, "size": size})


@dataclass(frozen=True)
class Status:
    """A node's status, as carried by STATUS. Scalars first (wire order), then the vectors."""

    node_state: NodeState = _doc("0 IDLE, 1 ARMED, 2 RUNNING, 3 SAFE_STOP, 4 FAULT")
    ticks: int = _doc("states answered")
    misses: int = _doc("deadline misses (the policy ran past the budget)")
    stale: int = _doc("stale states and stale periodic checks")
    fallbacks: int = _doc("fallback commands (held or safe command)")
    bounds_clamped: int = _doc("commands clamped to the actuator bounds")
    rate_clamped: int = _doc("commands clamped by the rate limiter")
    state_invalid: int = _doc("states that were NaN/Inf or of the wrong size")
    action_invalid: int = _doc("policy actions that were NaN/Inf or of the wrong size")
    obs_out_of_range: int = _doc("states outside the observation envelope")
    malformed: int = _doc("malformed messages (state and control channels)")
    p50_us: float = _doc("node latency p50, state received -> command sent, over the last 5000 answered states, µs")
    p99_us: float = _doc("node latency p99, same window, µs")
    max_us: float = _doc("node latency maximum, same window, µs")
    replayed: int = _doc("states dropped as replayed or out of order")
    clock_jumps: int = _doc("states dropped as clock jumps (from the future)")
    resyncs: int = _doc("re-syncs to the state stream")
    over_budget: int = _doc("policy commands sent after the budget")
    auth_denied: int = _doc("CURVE handshakes refused")
    calibration_id: str | None = _doc("the calibration record's id: the first 6 hex digits of its SHA-256 as an "
                                      "integer; 0 without a record")
    latency_budget_ms: float = _doc("the latency budget, ms")
    act_dim: int = _doc("number of actuators")
    obs_dim: int = _doc("number of observation values")
    rt_cpu_affinity: int = _doc("the loop thread's CPU affinity (profile `realtime.cpu_affinity`): 1 applied, 0 off, "
                                "-1 refused (the node's log says why)")
    rt_cpu_mask: int = _doc("the CPUs the loop thread may run on, as a bit mask (bit i: CPU i; CPUs 0-52); 0 before "
                            "the loop starts")
    rt_sched_fifo_priority: int = _doc("the loop thread's SCHED_FIFO priority in force, 1-99; 0: the default "
                                       "scheduler; -1: `realtime.sched_fifo_priority` refused")
    rt_mlockall: int = _doc("`realtime.mlockall`: 1 applied (the process is locked in RAM), 0 off, -1 refused")
    spin_us: float = _doc("the busy-wait window around each expected state (profile `spin_us`), µs; 0: off")
    wrong_version: int = _doc("frames of another protocol version (state and control channels), dropped")
    restarts: int = _doc("state streams begun by a state with the restart flag (a robot's (re)start)")
    seq_gaps: int = _doc("states never read: the seqs skipped within a stream, and those before a restarted "
                         "stream's first state read (lost in ZeroMQ's conflating queue or before the connection)")
    superseded: int = _doc("states admitted but replaced by a newer one before they were due (flood guard)")
    max_delta_per_tick: tuple[float, ...] | None = _doc("the rate limit per actuator; NaN when the rate limiter "
                                                        "is off", "act_dim")
    obs_low: tuple[float, ...] | None = _doc("the observation envelope's lower bounds; NaN without an envelope",
                                             "obs_dim")
    obs_high: tuple[float, ...] | None = _doc("the observation envelope's upper bounds; NaN without an envelope",
                                              "obs_dim")

    # --- wire ----------------------------------------------------------------------------------
    def encode(self) -> bytes:
        """The STATUS payload (little-endian float64 values)."""
        scalars = []
        for f in SCALARS:
            v = getattr(self, f.name)
            scalars.append(int(v, 16) if f.name == "calibration_id" and v else 0 if v is None else v)
        vectors = [np.full(n, np.nan) if v is None else np.asarray(v, np.float64)
                   for v, n in ((self.max_delta_per_tick, self.act_dim), (self.obs_low, self.obs_dim),
                                (self.obs_high, self.obs_dim))]
        for v, n in zip(vectors, (self.act_dim, self.obs_dim, self.obs_dim)):
            if v.shape != (n,):
                raise ValueError(f"status vector of {v.size} values, expected {n}")
        return np.concatenate([np.asarray(scalars, np.float64), *vectors]).astype(WIRE_DTYPE).tobytes()

    @classmethod
    def decode(cls, payload) -> "Status":
        """A STATUS payload (bytes, or the float32 view ``protocol.decode`` gives) as a Status;
        ProtocolError when its size does not fit."""
        raw = payload if isinstance(payload, (bytes, bytearray, memoryview)) else np.ascontiguousarray(payload).tobytes()
        if len(raw) % 8:
            raise ProtocolError(f"STATUS payload of {len(raw)} bytes is not a whole number of float64 values")
        values = np.frombuffer(raw, WIRE_DTYPE)
        if len(values) < len(SCALARS):
            raise ProtocolError(f"STATUS payload of {len(values)} values, expected at least {len(SCALARS)}")
        head = dict(zip((f.name for f in SCALARS), values[:len(SCALARS)].tolist()))
        act, obs = int(head["act_dim"]), int(head["obs_dim"])
        if len(values) != len(SCALARS) + act + 2 * obs:
            raise ProtocolError(f"STATUS payload of {len(values)} values, expected {len(SCALARS) + act + 2 * obs} "
                                f"for act_dim {act} and obs_dim {obs}")
        try:
            head["node_state"] = NodeState(int(head["node_state"]))
        except ValueError:
            raise ProtocolError(f"unknown node state {head['node_state']}") from None
        for f in SCALARS:
            if f.type == "int":
                head[f.name] = int(head[f.name])
        cid = int(head["calibration_id"])
        head["calibration_id"] = f"{cid:06x}" if cid else None
        tail = values[len(SCALARS):].tolist()
        vec = lambda v: None if all(x != x for x in v) else tuple(v)  # noqa: E731
        return cls(**head, max_delta_per_tick=vec(tail[:act]), obs_low=vec(tail[act:act + obs]),
                   obs_high=vec(tail[act + obs:]))

    def to_dict(self) -> dict:
        """JSON-ready (``qsm-serve status`` prints it): the state by name, limits as lists (None when off)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["node_state"] = self.node_state.name
        d["latency_budget_ms"] = float(f"{self.latency_budget_ms:.6g}")
        for name in ("max_delta_per_tick", "obs_low", "obs_high"):
            v = d[name]
            d[name] = None if v is None else [float(f"{x:.6g}") for x in v]
        for name in ("rt_cpu_affinity", "rt_mlockall"):
            d[name] = RT_STATES.get(d[name], d[name])
        d["rt_sched_fifo_priority"] = RT_STATES[-1] if self.rt_sched_fifo_priority == -1 else self.rt_sched_fifo_priority
        d["rt_cpu_mask"] = [i for i in range(53) if self.rt_cpu_mask >> i & 1]
        return d


SCALARS = tuple(f for f in fields(Status) if f.metadata["size"] == "1")
"""The scalar fields, in wire order; the vector fields follow them."""


def payload_values(act_dim: int, obs_dim: int) -> int:
    """Number of float64 values in a STATUS payload."""
    return len(SCALARS) + act_dim + 2 * obs_dim


def markdown_table() -> str:
    """The STATUS payload table of docs/PROTOCOL.md (a test checks that the document holds it)."""
    lines = ["| position | field | values | meaning |", "|---|---|---|---|"]
    at = [str(len(SCALARS))]
    for i, f in enumerate(fields(Status)):
        size = f.metadata["size"]
        pos = str(i) if size == "1" else " + ".join(at)
        if size != "1":
            at.append(size)
        lines.append(f"| {pos} | `{f.name}` | {size} | {f.metadata['doc']} |")
    return "\n".join(lines)
