"""Serving benchmark: qsm-serve against qsm-sim at 500 Hz and 1000 Hz, then kill -9 of the node.

    python -m benchmarks.serve_latency --model deploy/models/cartpole.onnx [--seconds 60]

Both nodes run as separate processes on this machine, on the shipped profiles
deploy/profiles/cartpole-{500,1000}hz.json. Reports, per rate: achieved rate against nominal,
state-sent -> command-received latency at the robot (p50, p99, p99.9, max), deadline misses
(and whether each was answered by a fallback), stale states, clamps; and the time from a
kill -9 of qsm-serve to the robot applying its safe command. Prints a table and writes
benchmarks/results/serve_*.csv.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python benchmarks/serve_latency.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_csv
from qsm_robot.serve import protocol as P
from qsm_robot.serve.flight_record import node_ticks
from qsm_robot.serve.client import ControlClient
from qsm_robot.serve.profile import Profile

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
SERVE = [sys.executable, "-m", "qsm_robot.cli.serve"]
SIM = [sys.executable, "-m", "qsm_robot.robot.node"]


def wait_ready(endpoint: str, timeout: float = 30.0) -> None:
    client = ControlClient(endpoint, timeout_s=0.5)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                client.send(P.MsgType.HEARTBEAT)
                return
            except TimeoutError:
                pass
    finally:
        client.close()
    raise SystemExit("qsm-serve did not come up")


def run_pair(model: Path, profile_path: Path, episodes: int, work: Path, kill_after_s: float | None = None) -> dict:
    profile = Profile.load(profile_path)
    scenario = work / "scenario.json"
    scenario.write_text(json.dumps({"name": "bench", "seed": 0, "episodes": episodes}))
    rec = work / f"rec-{profile.name}-{'kill' if kill_after_s else 'run'}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    serve = subprocess.Popen(SERVE + ["run", "--model", str(model), "--profile", str(profile_path), "--arm",
                                      "--record-dir", str(rec)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_ready(profile.endpoints.control)
    results = work / f"robot-{profile.name}.json"
    sim = subprocess.Popen(SIM + ["--profile", str(profile_path), "--scenario", str(scenario), "--results", str(results)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    if kill_after_s is not None:
        client = ControlClient(profile.endpoints.control, timeout_s=0.5)
        try:  # kill only once the loop runs: the robot takes seconds to load its physics
            while client.send(P.MsgType.HEARTBEAT)["node_state"] != "RUNNING":
                time.sleep(0.05)
        finally:
            client.close()
        time.sleep(kill_after_s)
        killed_at = time.monotonic_ns()
        os.kill(serve.pid, signal.SIGKILL)
    sim.wait()
    if killed_at is None:
        serve.send_signal(signal.SIGTERM)
    serve.communicate()
    robot = json.loads(results.read_text())
    row = {"profile": profile.name, "nominal_hz": profile.rate_hz, "achieved_hz": round(robot["achieved_rate_hz"], 2),
           "rate_error_pct": round(100 * (robot["achieved_rate_hz"] / profile.rate_hz - 1), 3),
           **{f"robot_{k}_us": round(v, 1) for k, v in robot["latency_us"].items()},
           "robot_ticks": robot["steps"], "late_at_robot": robot["commands_late"], "ticks_late": robot["ticks_late"]}
    if killed_at is not None:
        after = [(t, n) for t, n in zip(robot["watchdog_trip_t_ns"], robot["watchdog_periods_to_safe"]) if t >= killed_at]
        row = {"profile": profile.name, "nominal_hz": profile.rate_hz,
               "kill_to_safe_ms": round((after[0][0] - killed_at) / 1e6, 2) if after else None,
               "kill_to_safe_periods": round((after[0][0] - killed_at) / 1e9 * profile.rate_hz, 2) if after else None,
               "watchdog_periods_to_safe": after[0][1] if after else None,
               "watchdog_trips_before_kill": len(robot["watchdog_trip_t_ns"]) - len(after)}
        return row
    (record,) = rec.glob("flight-*.mcap")
    ticks = node_ticks(record)
    flags = ticks["flags"]
    F = P.TickFlag
    miss = (flags & int(F.MISS)) > 0
    row.update({
        "node_ticks": len(ticks), "misses": int(miss.sum()), "miss_pct": round(100 * miss.mean(), 4),
        "misses_with_fallback": int((miss & ((flags & int(F.FALLBACK)) > 0)).sum()),
        "stale": int(((flags & int(F.STALE)) > 0).sum()),
        "bounds_clamps": int(((flags & int(F.BOUNDS_CLAMPED)) > 0).sum()), "rate_clamps": int(((flags & int(F.RATE_CLAMPED)) > 0).sum()),
        "node_p99.9_us": round(float(np.percentile((ticks["t_send_ns"] - ticks["t_recv_ns"]) / 1e3, 99.9)), 1),
    })
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="ONNX policy from qsm-export (task cartpole-swingup)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rates", type=int, nargs="+", default=[500, 1000])
    args = p.parse_args()
    work = OUT / f"serve-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    rows, kills = [], []
    for rate in args.rates:
        profile = REPO / "deploy" / "profiles" / f"cartpole-{rate}hz.json"
        episodes = max(1, round(args.seconds * rate / Profile.load(profile).robot.episode_steps))
        rows.append(run_pair(args.model, profile, episodes, work))
        print(f"{rate} Hz done", file=sys.stderr)
        kills.append(run_pair(args.model, profile, 2, work, kill_after_s=1.0))
    for table in (rows, kills):
        print_table(table)
        print()
    write_csv(work / "serve.csv", rows + kills)
    print(f"wrote {work}/serve.csv")


if __name__ == "__main__":
    main()
