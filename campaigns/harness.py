"""What the campaign scripts share: starting qsm-serve and qsm-sim as separate processes,
reading their output and stopping them, waiting for the node, asking it for its status, reading
its exit summary and a process's memory, printing tables.

The campaigns run the shipped commands (``python -m qsm_robot.cli.serve``, ``python -m
qsm_robot.robot.node``) exactly as an operator would, so what they measure is what ships.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import print_table, write_csv  # noqa: F401  (re-exported for the campaigns)
from qsm_robot.serve import protocol as P
from qsm_robot.serve.client import ControlClient
from qsm_robot.serve.profile import Profile, ProfileError
from qsm_robot.serve.telemetry import ServeSummary

REPO = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-m", "qsm_robot.cli.serve"]
SIM = [sys.executable, "-m", "qsm_robot.robot.node"]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MODEL = REPO / "deploy" / "models" / "cartpole-ref-k1.onnx"
"""The reference K=1 student the campaigns run by default (``qsm-export RUN --out`` writes it)."""


def load_inputs(prog: str, model: Path, profile_path: Path) -> Profile:
    """The campaign's profile, after checking that the model exists; exits 2 with the reason."""
    try:
        if not model.is_file():
            raise ProfileError(f"model {model} does not exist: export one with 'qsm-export RUN --out {model}' "
                               "or pass --model")
        return Profile.load(profile_path)
    except ProfileError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def child_env() -> dict[str, str]:
    """One thread per process: the node and the robot share this machine's cores."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start_serve(model: Path, profile: Path, record_dir: Path, *extra: str, arm: bool = True) -> subprocess.Popen:
    """qsm-serve run as a child process; stdout (the summary) and stderr (the log) are piped."""
    cmd = SERVE + ["run", "--model", str(model), "--profile", str(profile), "--record-dir", str(record_dir), *extra]
    if arm:
        cmd.append("--arm")
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_sim(profile: Path, scenario: Path, results: Path, *extra: str, quiet: bool = False) -> subprocess.Popen:
    """qsm-sim as a child process; it writes its RobotReport JSON to ``results`` when it ends."""
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(SIM + ["--profile", str(profile), "--scenario", str(scenario), "--results", str(results), *extra],
                            cwd=REPO, env=child_env(), stdout=out, stderr=out, text=True)


def terminate(proc: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM a child (qsm-serve then writes its flight record and summary, qsm-sim its report)
    and wait for it; SIGKILL if it has not ended within ``timeout_s``. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode


def status(endpoint: str, kind: P.MsgType = P.MsgType.HEARTBEAT, timeout_s: float = 0.5, **client_kw) -> dict:
    """Send one control message to a node and return its STATUS reply (TimeoutError if none)."""
    client = ControlClient(endpoint, timeout_s=timeout_s, **client_kw)
    try:
        return client.send(kind)
    finally:
        client.close()


def wait_ready(endpoint: str, proc: subprocess.Popen | None = None, timeout_s: float = 60.0, **client_kw) -> dict:
    """Poll the node's control channel until it answers; fail early if its process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"qsm-serve exited with {proc.returncode}: {proc.communicate()[1][-2000:]}")
        try:
            return status(endpoint, **client_kw)
        except TimeoutError:
            continue
    raise RuntimeError(f"qsm-serve did not answer on {endpoint} within {timeout_s} s")


def serve_summary(path: Path) -> dict:
    """A qsm-serve exit summary (summary-*.json) as a dict, checked against ServeSummary (its keys
    are documented there); ValueError when it is not one."""
    return ServeSummary.load(path).to_dict()


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def ipc_endpoints(folder: Path) -> dict[str, str]:
    """Private ipc:// endpoints in ``folder``: campaigns never collide with a node on the shipped ports."""
    return {k: f"ipc://{folder}/{k}.sock" for k in ("state", "command", "control")}


def private_profile(profile: Path, work_dir: Path, **overrides) -> Path:
    """A copy of a profile JSON in ``work_dir`` with private ipc endpoints there (and any field
    overrides): a campaign's nodes never collide with another node on the shipped ports."""
    data = json.loads(Path(profile).read_text())
    data.update(overrides, endpoints=ipc_endpoints(work_dir))
    return write_json(Path(work_dir) / "profile.json", data)


class Drain:
    """Reads a child's piped stdout and stderr on background threads, so that a long run never
    blocks on a full pipe; ``lines`` holds (time.monotonic_ns() of its arrival, line) for both, in
    arrival order. ``wait()`` waits for the child's end and returns (stdout, stderr)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.out, self.err = proc, [], []
        self.lines: list[tuple[int, str]] = []
        self._threads = [threading.Thread(target=self._pump, args=(stream, buf), daemon=True)
                         for stream, buf in ((proc.stdout, self.out), (proc.stderr, self.err)) if stream is not None]
        for t in self._threads:
            t.start()

    def _pump(self, stream, buf: list) -> None:
        for line in stream:
            buf.append(line)
            self.lines.append((time.monotonic_ns(), line.rstrip("\n")))

    def wait(self, timeout_s: float | None = None) -> tuple[str, str]:
        self.proc.wait(timeout_s)
        for t in self._threads:
            t.join(timeout=5)
        return "".join(self.out), "".join(self.err)
