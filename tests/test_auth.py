"""CURVE on the node's channels: only clients whose public key is allowed can connect, and the
exposure rules (loopback by default; beyond it only with CURVE or an explicit flag and a warning)."""

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, profile_data

from qsm_robot.serve import protocol as P
from qsm_robot.serve.auth import AuthError, generate_keypair
from qsm_robot.serve.client import ControlClient
from qsm_robot.serve.node import ServeNode
from qsm_robot.serve.profile import Profile

SERVE = [sys.executable, "-m", "qsm_robot.cli.serve"]


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    for name in ("node", "operator", "robot", "intruder"):
        generate_keypair(d, name)
    allowed = d / "allowed"
    allowed.mkdir()
    for name in ("operator", "robot"):
        (allowed / f"{name}.key").write_bytes((d / f"{name}.key").read_bytes())
    return d


def curve_profile(tmp_path, keys, **endpoints) -> Path:
    data = profile_data(
        "auth", require_calibration=False,
        endpoints=endpoints or {k: f"ipc://{tmp_path}/{k}.sock" for k in ("state", "command", "control")},
        curve={"server_secret_key": "keys/node.key_secret", "server_public_key": "keys/node.key",
               "allowed_clients": "keys/allowed"})
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def curve_node(tmp_path, keys, tiny_model):
    node = ServeNode(tiny_model, Profile.load(curve_profile(tmp_path, keys)), seed=0)
    thread = threading.Thread(target=node.run, kwargs={"duration_s": 20.0})
    thread.start()
    yield node
    node.request_stop()
    thread.join()
    node.close()


def cli(*args, timeout=20):
    return subprocess.run(SERVE + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_keygen_writes_a_public_key_and_a_private_secret_and_never_overwrites(tmp_path):
    out = cli("keygen", "--dir", str(tmp_path), "--name", "op")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "op.key").is_file()
    assert stat.S_IMODE(os.stat(tmp_path / "op.key_secret").st_mode) == 0o600
    again = cli("keygen", "--dir", str(tmp_path), "--name", "op")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_only_allowed_clients_can_arm_or_read_status(curve_node, tmp_path, keys):
    profile = str(tmp_path / "profile.json")
    # A real second client in its own process, with a key that is not on the allow-list:
    intruder = cli("arm", "--profile", profile, "--key", str(keys / "intruder.key_secret"), "--timeout", "1")
    assert intruder.returncode == 2 and "no status reply" in intruder.stderr
    # ... and one with no key at all (plain ZeroMQ): the handshake never completes.
    plain = ControlClient(curve_node.profile.endpoints.control, timeout_s=1.0)
    try:
        with pytest.raises(TimeoutError):
            plain.send(P.MsgType.ARM)
    finally:
        plain.close()
    assert curve_node.core.state == P.NodeState.IDLE
    status = cli("status", "--profile", profile, "--key", str(keys / "operator.key_secret"))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["node_state"] == "IDLE" and json.loads(status.stdout)["auth_denied"] >= 1
    armed = cli("arm", "--profile", profile, "--key", str(keys / "operator.key_secret"))
    assert json.loads(armed.stdout)["node_state"] == "ARMED"


def test_a_curve_profile_needs_the_clients_key(tmp_path, keys):
    out = cli("status", "--profile", str(curve_profile(tmp_path, keys)))
    assert out.returncode == 2 and "pass --key" in out.stderr
    with pytest.raises(AuthError, match="holds no secret key"):
        ControlClient("ipc:///nonexistent", key=keys / "operator.key", server_key=keys / "node.key")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_beyond_loopback_needs_curve_or_an_explicit_flag_with_a_warning(tmp_path, keys, tiny_model):
    endpoints = {k: f"tcp://0.0.0.0:{free_port()}" for k in ("state", "command", "control")}
    plain = Profile.load(curve_profile(tmp_path, keys, **endpoints))
    plain.curve = None
    with pytest.raises(ValueError, match="not loopback and the profile has no CURVE keys"):
        ServeNode(tiny_model, plain)
    logs = []
    node = ServeNode(tiny_model, plain, allow_remote=True, log=logs.append)
    node.close()
    assert any("WARNING" in m and "WITHOUT authentication" in m for m in logs)
    logs.clear()
    node = ServeNode(tiny_model, Profile.load(curve_profile(tmp_path, keys, **endpoints)), log=logs.append)
    node.close()
    assert not any("WARNING" in m for m in logs)


@pytest.mark.parametrize("key, commanded", [("robot", True), ("intruder", False)])
def test_only_an_allowed_robot_exchanges_states_and_commands(curve_node, tmp_path, keys, key, commanded):
    assert curve_node.core.arm("test")
    (tmp_path / "scenario.json").write_text(json.dumps({"name": "auth", "seed": 0, "episodes": 1, "episode_steps": 60}))
    sim = subprocess.run([sys.executable, "-m", "qsm_robot.robot.node", "--profile", str(tmp_path / "profile.json"),
                          "--scenario", str(tmp_path / "scenario.json"), "--results", str(tmp_path / "robot.json"),
                          "--key", str(keys / f"{key}.key_secret")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert sim.returncode == 0, sim.stderr
    robot = json.loads((tmp_path / "robot.json").read_text())
    if commanded:
        assert robot["commands_applied"] >= 50 and curve_node.core.counters.ticks >= 50
    else:
        assert robot["commands_applied"] == 0 and robot["watchdog_trips"] == 1 and curve_node.core.counters.ticks == 0
