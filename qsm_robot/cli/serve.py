"""``qsm-serve``: the real-time control node, and operator commands for it.

    qsm-serve run --model deploy/models/cartpole.onnx --profile deploy/profiles/cartpole-sim.json [--arm]
    qsm-serve arm|disarm|estop|status --profile deploy/profiles/cartpole-sim.json
    qsm-serve plot runs/serve/flight.npz

Imports numpy, pyzmq and onnxruntime only (with matplotlib, if installed, for the plot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROG = "qsm-serve"


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _status_line(node) -> None:
    lat = node.latency_us(last=2000)
    rate = getattr(node, "_rate", 0.0)
    line = (f"{node.state.name:9s} {rate:7.1f} Hz | node latency p50 {lat['p50']:6.0f} us p99 {lat['p99']:6.0f} us "
            f"max {lat['max']:6.0f} us | miss {node.counters.misses} stale {node.counters.stale} "
            f"fallback {node.safety.counts['fallbacks']} clamps {node.safety.counts['bounds_clamped']}/"
            f"{node.safety.counts['rate_clamped']} bad-in {node.safety.counts['state_invalid'] + node.counters.malformed}")
    if sys.stderr.isatty():
        print("\r" + line, end="", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def run(args) -> int:
    from qsm_robot.export.contract import ContractError
    from qsm_robot.serve.node import ServeNode, install_signal_handlers
    from qsm_robot.serve.profile import Profile, ProfileError
    from qsm_robot.serve.telemetry import plot_histogram

    if not Path(args.model).is_file():
        return _fail(f"model {args.model} does not exist (write one with qsm-export)")
    try:
        profile = Profile.load(args.profile)
        node = ServeNode(args.model, profile, seed=args.seed, allow_remote=args.allow_remote)
    except (ProfileError, ContractError, ValueError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # onnxruntime's load errors, zmq's bind errors
        return _fail(f"{type(exc).__name__}: {exc}")
    install_signal_handlers(node)
    c = node.runner.contract
    print(f"{PROG}: {args.model} ({c.sampler}, {c.sampler_steps} step(s), task {c.task}) under profile "
          f"{profile.name!r}: {profile.rate_hz:g} Hz, budget {profile.latency_budget_ms} ms; "
          f"state {profile.endpoints.state}, command {profile.endpoints.command}, control {profile.endpoints.control}",
          file=sys.stderr)
    if args.arm:
        node.arm("armed at start (--arm)")

    last = {"t": time.monotonic(), "ticks": 0}

    def status(n):
        t = time.monotonic()
        n._rate = (n.counters.ticks - last["ticks"]) / (t - last["t"])
        last.update(t=t, ticks=n.counters.ticks)
        _status_line(n)

    t0 = time.monotonic()
    try:
        node.run(duration_s=args.duration, status=status)
    finally:
        wall = time.monotonic() - t0
        node.close()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    out = Path(args.record_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    npz = node.recorder.save(out / f"flight-{stamp}.npz", profile=json.dumps(profile.to_dict()), model=str(args.model))
    png = plot_histogram(npz)
    lat = node.latency_us(last=10**9)
    s = node.safety.counts
    rows = [
        ("wall time", f"{wall:.1f} s"), ("states answered", node.counters.ticks),
        ("mean rate", f"{node.answered_rate_hz():.1f} Hz while states came (profile {profile.rate_hz:g} Hz)"),
        ("node latency", f"p50 {lat['p50']:.0f} us, p99 {lat['p99']:.0f} us, p99.9 {lat['p99.9']:.0f} us, max {lat['max']:.0f} us"),
        ("deadline misses", node.counters.misses), ("stale", node.counters.stale), ("fallbacks", s["fallbacks"]),
        ("clamps (bounds / rate)", f"{s['bounds_clamped']} / {s['rate_clamped']}"),
        ("invalid states / actions", f"{s['state_invalid']} / {s['action_invalid']}"),
        ("malformed / replayed msgs", f"{node.counters.malformed} / {node.counters.replayed}"),
        ("out of envelope", s["obs_out_of_range"]), ("safe-stops", f"{node.counters.safe_stops} {node.counters.reasons[:3]}"),
        ("internal errors", node.counters.errors), ("final state", node.state.name),
        ("flight record", npz), ("latency histogram", png or "matplotlib not installed: qsm-serve plot " + str(npz)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(["== qsm-serve summary =="] + [f"{k:<{width}}  {v}" for k, v in rows]))
    return 0


def control(args) -> int:
    from qsm_robot.serve import protocol as P
    from qsm_robot.serve.client import ControlClient
    from qsm_robot.serve.profile import Profile, ProfileError

    try:
        endpoint = args.endpoint or Profile.load(args.profile).endpoints.control
    except ProfileError as exc:
        return _fail(str(exc))
    kind = {"arm": P.MsgType.ARM, "disarm": P.MsgType.DISARM, "estop": P.MsgType.ESTOP, "status": P.MsgType.HEARTBEAT}[args.cmd]
    client = ControlClient(endpoint, timeout_s=args.timeout)
    try:
        status = client.send(kind)
    except TimeoutError as exc:
        return _fail(str(exc))
    finally:
        client.close()
    print(json.dumps(status))
    return 0


def plot(args) -> int:
    from qsm_robot.serve.telemetry import plot_histogram

    png = plot_histogram(Path(args.record))
    if png is None:
        return _fail("matplotlib is not installed here: pip install matplotlib")
    print(png)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Real-time ZeroMQ control node for an exported ONNX policy.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the control node")
    r.add_argument("--model", required=True, help="ONNX policy written by qsm-export")
    r.add_argument("--profile", required=True, help="deployment profile JSON")
    r.add_argument("--arm", action="store_true", help="arm at start (otherwise send ARM with 'qsm-serve arm')")
    r.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C/SIGTERM)")
    r.add_argument("--seed", type=int, default=0, help="seed of the policy's noise stream")
    r.add_argument("--record-dir", default="runs/serve", help="where the flight record and histogram go")
    r.add_argument("--allow-remote", action="store_true", help="allow non-loopback endpoints (prints a warning)")
    r.set_defaults(func=run)
    for name in ("arm", "disarm", "estop", "status"):
        c = sub.add_parser(name, help=f"send {name.upper()} to a running node and print its status")
        c.add_argument("--profile", help="profile whose control endpoint to use")
        c.add_argument("--endpoint", help="control endpoint (instead of --profile)")
        c.add_argument("--timeout", type=float, default=1.0)
        c.set_defaults(func=control)
    pl = sub.add_parser("plot", help="draw the latency histogram of a flight record")
    pl.add_argument("record")
    pl.set_defaults(func=plot)
    args = p.parse_args(argv)
    if args.cmd in ("arm", "disarm", "estop", "status") and not (args.profile or args.endpoint):
        p.error("give --profile or --endpoint")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
