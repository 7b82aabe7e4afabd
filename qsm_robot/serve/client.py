"""An operator client for the control channel: ARM, DISARM, ESTOP, status (HEARTBEAT)."""

from __future__ import annotations

import zmq

from qsm_robot.serve import protocol as P
from qsm_robot.serve.node import STATUS_FIELDS


class ControlClient:
    def __init__(self, endpoint: str, timeout_s: float = 1.0):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
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
                status = dict(zip(STATUS_FIELDS, msg.payload.tolist()))
                status["node_state"] = P.NodeState(int(status["node_state"])).name
                return status

    def close(self) -> None:
        self.sock.close(0)
