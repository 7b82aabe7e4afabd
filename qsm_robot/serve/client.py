"""An operator client for the control channel: ARM, DISARM, ESTOP, status (HEARTBEAT)."""

from __future__ import annotations

from pathlib import Path

import zmq

from qsm_robot.serve import protocol as P
from qsm_robot.serve.auth import AuthError, secure_client
from qsm_robot.serve.status import Status


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

    def send(self, kind: P.MsgType) -> dict:
        """Send one control message; return the node's status reply as a dict (``Status.to_dict``)."""
        return self.request(kind).to_dict()

    def request(self, kind: P.MsgType) -> Status:
        """Send one control message; return the node's status reply. A reply of another protocol
        version raises ``protocol.VersionError`` (its text names both versions)."""
        self.seq += 1
        self.sock.send(P.encode(kind, self.seq))
        while True:
            try:
                msg = P.decode(self.sock.recv())
            except zmq.Again:
                raise TimeoutError("no status reply from the node (is qsm-serve running on that endpoint?)") from None
            if msg.type == P.MsgType.STATUS and msg.ref == self.seq:
                return Status.decode(msg.payload)

    def close(self) -> None:
        self.sock.close(0)
