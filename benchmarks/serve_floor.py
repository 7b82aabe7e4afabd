"""What the serving node adds to the wire's own round trip: bare echo vs qsm-serve, side by side.

    python -m benchmarks.serve_floor --model MODEL.onnx [--seconds 4] [--repeats 3] [--rates 500 1000]

In one run, for each rate and with the real-time settings off and on, segments alternate
(echo, node, echo, node, ...) so that both see the same machine. Both are driven by the same
robot, ``qsm-sim`` on the shipped cartpole-{rate}hz profile, which reports the latency it sees
(state sent -> command received: p50, p99, p99.9, max):

* echo: this module in ``--echo`` mode, a separate process with the node's own sockets and options
  (``serve.node.bind_sockets``), answering each state at once with a command of the same size
  (zeros, ``ref`` = the state's seq): the floor of ZeroMQ, the kernel and this machine;
* node: ``qsm-serve run --arm`` with the policy and the full safety chain.

Real-time settings "on": the node (and the echo) pinned to CPU 1 with SCHED_FIFO priority 50,
mlockall and spin_us 200; the robot pinned to CPU 0 with mlockall. A setting the OS refuses is
reported in the "rt" column (as qsm-serve's banner reports it) and the run goes on without it.
Per row: medians over the repeats of each percentile, and node / echo ratios. Targets (issue
13): node p99.9 <= 1.25 x echo p99.9 at 500 Hz; node p99.9 <= 1 ms with the settings on.
Writes benchmarks/results/serve-floor-*/floor.csv.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python benchmarks/serve_floor.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_csv
from campaigns.harness import REPO, SERVE, SIM
from campaigns.harness import RESULTS as OUT

STATS = ("p50", "p99", "p99.9", "max")
RT_ON = {"realtime": {"cpu_affinity": [1], "sched_fifo_priority": 50, "mlockall": True}, "spin_us": 200.0,
         "robot": {"realtime": {"cpu_affinity": [0], "mlockall": True}}}


def echo(profile_path: Path) -> None:
    """The bare round trip: the node's sockets, a command of the node's size for every state at once."""
    import zmq

    from qsm_robot.serve import protocol as P
    from qsm_robot.serve import realtime
    from qsm_robot.serve.node import bind_sockets
    from qsm_robot.serve.profile import Profile

    profile = Profile.load(profile_path)
    # As the node: sockets (and ZeroMQ's I/O thread) first, then the loop thread's settings.
    state, command, control = bind_sockets(zmq.Context.instance(), profile)
    report = realtime.apply(profile.realtime, profile.spin_us)
    zeros = np.zeros(profile.act_dim, np.float32)
    period_ns, spin_ns = int(1e9 / profile.rate_hz), int(profile.spin_us * 1e3)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print(json.dumps({"ready": True, "rt": rt_text(*(o.code for o in report.outcomes))}), flush=True)
    seq, expected = 0, None
    while not stop:
        timeout_ms = 100
        if spin_ns and expected is not None:  # as the node: spin (poll without blocking) around the expected arrival
            now = time.monotonic_ns()
            if expected - spin_ns <= now < expected + spin_ns:
                timeout_ms = 0
            elif now < expected - spin_ns:
                timeout_ms = -(-(expected - spin_ns - now) // 1_000_000)
        if not state.poll(timeout_ms):
            continue
        msg = P.decode(state.recv())
        expected = time.monotonic_ns() + period_ns
        seq += 1
        command.send(P.encode(P.MsgType.COMMAND, seq, zeros, ref=msg.seq))
    for s in (state, command, control):
        s.close(0)


def rt_text(affinity: int, fifo: int, mlock: int) -> str:
    """The real-time settings' outcomes (STATUS codes: 0 off, 1 applied, -1 refused) in a few words."""
    from qsm_robot.serve.realtime import CODES

    name = {code: state for state, code in CODES.items()}
    return f"affinity {name[affinity]}, fifo {name[fifo]}, mlock {name[mlock]}"


def write_profile(base: Path, rt: bool, work: Path) -> Path:
    data = json.loads(base.read_text())
    if rt:
        data.update({k: v for k, v in RT_ON.items() if k != "robot"})
        data["robot"] = {**data.get("robot", {}), **RT_ON["robot"]}
    path = work / f"{data['name']}-{'rt' if rt else 'plain'}.json"
    path.write_text(json.dumps(data))
    return path


def segment(kind: str, model: Path, profile_path: Path, seconds: float, work: Path, n: int) -> dict:
    """One robot run against the echo or the node; the robot's latency figures."""
    from qsm_robot.serve.profile import Profile

    profile = Profile.load(profile_path)
    episodes = max(1, round(seconds * profile.rate_hz / profile.robot.episode_steps))
    scenario = work / "scenario.json"
    scenario.write_text(json.dumps({"name": "floor", "seed": 0, "episodes": episodes}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kind == "echo":
        server = subprocess.Popen([sys.executable, "-m", "benchmarks.serve_floor", "--echo", str(profile_path)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        rt = json.loads(server.stdout.readline())["rt"]
    else:
        server = subprocess.Popen(SERVE + ["run", "--model", str(model), "--profile", str(profile_path), "--arm",
                                           "--record-dir", str(work / f"rec-{n}")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rt = wait_node(profile, server)
    results = work / f"robot-{n}.json"
    subprocess.run(SIM + ["--profile", str(profile_path), "--scenario", str(scenario), "--results", str(results)],
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    server.send_signal(signal.SIGTERM)
    server.communicate(timeout=60)
    robot = json.loads(results.read_text())
    return {"kind": kind, "rt": rt, **{k: robot["latency_us"][k] for k in STATS},
            "achieved_hz": robot["achieved_rate_hz"], "late": robot["commands_late"]}


def wait_node(profile, server, timeout: float = 60.0) -> str:
    """Wait until qsm-serve answers on its control channel; its real-time summary from STATUS."""
    from qsm_robot.serve import protocol as P
    from qsm_robot.serve.client import ControlClient

    client = ControlClient(profile.endpoints.control, timeout_s=0.5)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"qsm-serve exited: {server.stderr.read()[-2000:]}")
            try:
                s = client.request(P.MsgType.HEARTBEAT)
            except TimeoutError:
                continue
            fifo = -1 if s.rt_sched_fifo_priority < 0 else int(s.rt_sched_fifo_priority > 0)
            return rt_text(int(s.rt_cpu_affinity), fifo, int(s.rt_mlockall))
    finally:
        client.close()
    raise SystemExit("qsm-serve did not come up")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="ONNX policy for cartpole-swingup (qsm-export)")
    p.add_argument("--seconds", type=float, default=4.0, help="robot time per segment")
    p.add_argument("--repeats", type=int, default=3, help="echo/node pairs per rate and setting")
    p.add_argument("--rates", type=int, nargs="+", default=[500, 1000])
    p.add_argument("--echo", type=Path, metavar="PROFILE", help=argparse.SUPPRESS)  # the echo process itself
    args = p.parse_args()
    if args.echo:
        return echo(args.echo)
    if args.model is None:
        p.error("--model is required")
    work = OUT / f"serve-floor-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    rows, segments, n = [], [], 0
    for rate in args.rates:
        for rt in (False, True):
            profile = write_profile(REPO / "deploy" / "profiles" / f"cartpole-{rate}hz.json", rt, work)
            runs: dict[str, list[dict]] = {"echo": [], "node": []}
            for _ in range(args.repeats):
                for kind in ("echo", "node"):
                    n += 1
                    seg = segment(kind, args.model, profile, args.seconds, work, n)
                    runs[kind].append(seg)
                    segments.append({"rate_hz": rate, "rt": rt, **seg})
                    print(f"{rate} Hz rt={rt} {kind}: p99.9 {seg['p99.9']:.0f} us", file=sys.stderr)
            med = {kind: {k: statistics.median(s[k] for s in runs[kind]) for k in STATS} for kind in runs}
            row = {"rate_hz": rate, "realtime": "on" if rt else "off", "node_rt": runs["node"][0]["rt"]}
            for kind in ("echo", "node"):
                row.update({f"{kind}_{k}_us": round(med[kind][k], 1) for k in STATS})
            row.update({f"ratio_{k}": round(med["node"][k] / med["echo"][k], 2) for k in STATS})
            rows.append(row)
    print_table(rows)
    write_csv(work / "floor.csv", rows)
    write_csv(work / "segments.csv", segments)
    print(f"wrote {work}/floor.csv and segments.csv")


if __name__ == "__main__":
    main()
