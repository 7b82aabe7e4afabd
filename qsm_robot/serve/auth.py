"""CURVE authentication and encryption of the node's channels (pyzmq only, no torch).

When a profile has a ``curve`` section, every socket the node binds (state, command, control) is a
CURVE server with the node's key pair, and a ZAP handler admits only clients whose public key is
in the allow-list folder. A peer without an allowed key never completes the handshake: it can
neither send a state, read a command, nor arm, disarm or e-stop the node. Denied handshakes are
counted (``auth_denied`` in the node's status).

Keys are ZeroMQ certificate files, written by ``qsm-serve keygen``: ``NAME.key`` holds the public
key (copy it into the node's allow-list folder), ``NAME.key_secret`` holds both keys (keep it on
the machine it identifies, mode 0600).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from qsm_robot.serve.profile import CurveSettings


class AuthError(ValueError):
    """A missing or unreadable key, or a CURVE set-up that cannot work; the text says which."""


def generate_keypair(folder: str | Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (0600) into folder; refuse to replace existing keys."""
    if not zmq.has("curve"):
        raise AuthError("this libzmq was built without CURVE support")
    if not name or "/" in name or name.startswith("."):
        raise AuthError(f"key name {name!r} must be a plain file name")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not overwrite and (public.exists() or secret.exists()):
        raise AuthError(f"{public} or {secret} already exists: pick another name or pass --overwrite")
    public_file, secret_file = zmq.auth.create_certificates(folder, name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def load_keypair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read key pair {path}: {exc}") from None
    if secret is None:
        raise AuthError(f"{path} holds no secret key: give the .key_secret file written by qsm-serve keygen")
    return public, secret


def load_public_key(path: str | Path) -> bytes:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read public key {path}: {exc}") from None


def allowed_keys(folder: str | Path) -> set[bytes]:
    """The public keys (z85) of every ``*.key`` file in folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AuthError(f"allow-list folder {folder} does not exist")
    keys = {load_public_key(f) for f in sorted(folder.glob("*.key"))}
    if not keys:
        raise AuthError(f"allow-list folder {folder} holds no *.key file: no client could connect")
    return keys


class _AllowList:
    """ZAP credentials provider: admits the listed keys, counts the rest."""

    def __init__(self, keys: set[bytes]):
        self.keys, self.denied = keys, 0
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        with self._lock:
            self.denied += 1
        return False


class CurveServer:
    """The node's side: a ZAP authenticator thread and the server options for its sockets."""

    def __init__(self, ctx: zmq.Context, settings: CurveSettings):
        self.public, self.secret = load_keypair(settings.server_secret_key)
        self.allow = _AllowList(allowed_keys(settings.allowed_clients))
        self.authenticator = ThreadAuthenticator(ctx)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(domain="*", credentials_provider=self.allow)

    @property
    def denied(self) -> int:
        return self.allow.denied

    def secure(self, sock: zmq.Socket) -> None:
        """Make sock a CURVE server (set before bind)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        self.authenticator.stop()


def secure_client(sock: zmq.Socket, client_key_file: str | Path, server_public_key_file: str | Path) -> None:
    """Make sock a CURVE client of the node (set before connect)."""
    public, secret = load_keypair(client_key_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = load_public_key(server_public_key_file)
