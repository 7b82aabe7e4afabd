"""An operator client for the control channel: ARM, DISARM, ESTOP, status (HEARTBEAT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zmq

from qsm_robot.serve import protocol as P
from qsm_robot.serve.auth import AuthError, secure_client
from qsm_robot.serve.node import STATUS_FIELDS


def decode_status(payload: np.ndarray) -> dict:
    """A STATUS payload as a dict: the counters, then the safety chain's limits as lists (None when off)."""
    values = payload.tolist()
    status = dict(zip(STATUS_FIELDS, values))
    status["node_state"] = P.NodeState(int(status["node_state"])).name
    if len(values) > len(STATUS_FIELDS):
        cid = int(status["calibration_id"])
        status["calibration_id"] = f"{cid:06x}" if cid else None
        act, obs = int(status["act_dim"]), int(status["obs_dim"])
        tail = values[len(STATUS_FIELDS):]
        limits = {"max_delta_per_tick": tail[:act], "obs_low": tail[act:act + obs], "obs_high": tail[act + obs:act + 2 * obs]}
        for name, v in limits.items():
            status[name] = None if not v or all(x != x for x in v) else [float(f"{x:.6g}") for x in v]
        status["latency_budget_ms"] = float(f"{status['latency_budget_ms']:.6g}")
    return status


class ControlClient:
    def __init__(self, endpoint: str, timeout_s: float = 1.0, key: str | Path | None = None,
                 server_key: str | Path | None = None):
        """key: this operator's ``.key_secret`` and server_key: the node's public ``.key``, for a
        node whose profile has CURVE keys (both or neither)."""
        if (key is None) != (server_key is None):
            raise AuthError("CURVE needs both the client's key pair and the node's public key")
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if key is not None:
            secure_client(self.sock, key, server_key)
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        self.sock.connect(endpoint)
        self.seq = 0

    def send(self, kind: P.MsgType) -> dict[str, float]:
        """Send one control message; return the node's status reply as a dict."""
        self.seq += 1
        self.sock.send(P.encode(kind, self.seq))
        while True:
            try:
                msg = P.decode(self.sock.recv())
            except zmq.Again:
                raise TimeoutError("no status reply from the node (is qsm-serve running on that endpoint?)") from None
            if msg.type == P.MsgType.STATUS and msg.ref == self.seq:
                return decode_status(msg.payload)

    def close(self) -> None:
        self.sock.close(0)
