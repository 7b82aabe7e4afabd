"""``qsm-serve``: the real-time control node, and operator commands for it.

    qsm-serve profile --model M.onnx --name NAME [--out deploy/profiles/NAME.json]
    qsm-serve calibrate --model M.onnx --profile deploy/profiles/cartpole-sim.json --name NAME
    qsm-serve run --model M.onnx --profile deploy/profiles/cartpole-sim.json --calibration calib/NAME.json [--arm]
    qsm-serve arm|disarm|estop|status --profile deploy/profiles/cartpole-sim.json [--key operator.key_secret]
    qsm-serve keygen --dir deploy/keys --name operator
    qsm-serve plot runs/serve/flight-TIME.mcap

Imports numpy, pyzmq, onnxruntime and mcap only (with matplotlib, if installed, for the plot).
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
    lat = node.core.latency_us(last=2000)
    rate = node.rate_hz
    calib = f"calib {node.core.calibration_id}" if node.core.calibration_id else "uncalibrated"
    line = (f"{node.core.state.name:9s} {rate:7.1f} Hz {calib} | node latency p50 {lat['p50']:6.0f} us p99 {lat['p99']:6.0f} us "
            f"max {lat['max']:6.0f} us | miss {node.core.counters.misses} stale {node.core.counters.stale} "
            f"fallback {node.core.safety.counts['fallbacks']} clamps {node.core.safety.counts['bounds_clamped']}/"
            f"{node.core.safety.counts['rate_clamped']} bad-in {node.core.safety.counts['state_invalid'] + node.core.counters.malformed}")
    if sys.stderr.isatty():
        print("\r" + line, end="", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def load_calibrated_profile(model: str, profile_path: str, calibration: str | None):
    """(profile with the record's safety values applied, record or None); raises with the reason."""
    from qsm_robot.calibrate.record import CalibrationRecord, file_sha256
    from qsm_robot.serve.profile import Profile, ProfileError

    profile = Profile.load(profile_path)
    if calibration is None:
        if profile.require_calibration:
            raise ProfileError(f"profile {profile.name!r} requires a calibration record: run "
                               f"'qsm-serve calibrate --model {model} --profile {profile_path} --name NAME', "
                               "then pass --calibration calib/NAME.json")
        return profile, None
    record = CalibrationRecord.load(calibration)
    record.check(file_sha256(model), profile)
    return record.apply(profile), record


def run(args) -> int:
    from qsm_robot.calibrate.record import CalibrationError
    from qsm_robot.export.contract import ContractError
    from qsm_robot.files import atomic_write_text
    from qsm_robot.serve.node import ServeNode, install_signal_handlers
    from qsm_robot.serve.profile import ProfileError
    from qsm_robot.serve.telemetry import ServeSummary, plot_histogram

    if not Path(args.model).is_file():
        return _fail(f"model {args.model} does not exist (write one with qsm-export)")
    try:
        profile, record = load_calibrated_profile(args.model, args.profile, args.calibration)
        runner = None
        if args.inject_spike_every or args.inject_spike_ms:  # fault injection (campaigns)
            from qsm_robot.serve.fault_injection import SpikyRunner
            from qsm_robot.serve.policy_runner import PolicyRunner

            runner = SpikyRunner(PolicyRunner(args.model, seed=args.seed), args.inject_spike_every, args.inject_spike_ms)
        node = ServeNode(args.model, profile, seed=args.seed, allow_remote=args.allow_remote,
                         calibration_id=record.short_id if record else None, runner=runner)
    except (ProfileError, ContractError, CalibrationError, ValueError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # onnxruntime's load errors, zmq's bind errors
        return _fail(f"{type(exc).__name__}: {exc}")
    install_signal_handlers(node)
    rt = node.apply_realtime()  # this thread runs the loop; a refused setting is one warning, never a failure
    c = node.core.runner.contract
    source = f"calibration {record.name!r} (id {record.short_id})" if record else "the profile (no calibration record)"
    print(f"{PROG}: {args.model} ({c.sampler}, {c.sampler_steps} step(s), task {c.io.task}) under profile "
          f"{profile.name!r}: {profile.rate_hz:g} Hz; state {profile.endpoints.state}, command "
          f"{profile.endpoints.command}, control {profile.endpoints.control}"
          f"{'; CURVE on, ' + str(len(node.curve.allow.keys)) + ' allowed key(s)' if node.curve else ''}\n"
          f"{PROG}: safety from {source}: budget {profile.latency_budget_ms} ms, max_delta_per_tick "
          f"{profile.max_delta_per_tick}, obs_low {profile.obs_low}, obs_high {profile.obs_high}\n"
          f"{PROG}: {rt.banner()}", file=sys.stderr)
    if args.arm:
        node.core.arm("armed at start (--arm)")

    t0 = time.monotonic()
    try:
        node.run(duration_s=args.duration, status=_status_line)
    finally:
        wall = time.monotonic() - t0
        node.close()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    out = Path(args.record_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = node.core.recorder.save(out / f"flight-{stamp}.mcap", profile=json.dumps(profile.to_dict()),
                                model=str(args.model), realtime=json.dumps(rt.to_dict()))
    png = plot_histogram(record)
    lat = node.core.latency_us(last=None)
    s = node.core.safety.counts
    summary = ServeSummary.from_node(node, wall, record)
    atomic_write_text(out / f"summary-{stamp}.json", summary.to_json())
    rows = [
        ("wall time", f"{wall:.1f} s"), ("states answered", node.core.counters.ticks),
        ("mean rate", f"{summary.mean_rate_hz:.1f} Hz while states came (profile {profile.rate_hz:g} Hz)"),
        ("node latency", f"p50 {lat['p50']:.0f} us, p99 {lat['p99']:.0f} us, p99.9 {lat['p99.9']:.0f} us, max {lat['max']:.0f} us"),
        ("deadline misses", node.core.counters.misses),
        ("sent past the budget", f"{node.core.counters.over_budget} (policy in time, then the send was late)"), ("stale", node.core.counters.stale), ("fallbacks", s["fallbacks"]),
        ("clamps (bounds / rate)", f"{s['bounds_clamped']} / {s['rate_clamped']}"),
        ("invalid states / actions", f"{s['state_invalid']} / {s['action_invalid']}"),
        ("malformed / replayed msgs", f"{node.core.counters.malformed} / {node.core.counters.replayed}"),
        ("clock jumps / re-syncs", f"{node.core.counters.clock_jumps} / {node.core.counters.resyncs}"),
        ("out of envelope", s["obs_out_of_range"]), ("safe-stops", f"{node.core.counters.safe_stops} {list(node.core.counters.reasons)[:3]}"),
        ("internal errors", node.core.counters.errors), ("final state", node.core.state.name),
        ("flight record", f"{record} (MCAP, last {len(node.core.recorder.data)} ticks)"),
        ("latency histogram", png or "matplotlib not installed: qsm-serve plot " + str(record)),
        ("summary", out / f"summary-{stamp}.json"),
    ]
    if runner is not None and runner.every:
        rows.insert(5, ("injected stalls", f"{runner.spikes} (every {runner.every}th call)"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(["== qsm-serve summary =="] + [f"{k:<{width}}  {v}" for k, v in rows]))
    return 0


def control(args) -> int:
    from qsm_robot.serve import protocol as P
    from qsm_robot.serve.auth import AuthError
    from qsm_robot.serve.client import ControlClient
    from qsm_robot.serve.profile import Profile, ProfileError

    try:
        profile = Profile.load(args.profile) if args.profile else None
        endpoint = args.endpoint or profile.endpoints.control
        server_key = args.server_key or (profile.curve.server_public_key if profile and profile.curve else None)
        if server_key and not args.key:
            return _fail("the node uses CURVE: pass --key with your .key_secret file (qsm-serve keygen)")
        kind = {"arm": P.MsgType.ARM, "disarm": P.MsgType.DISARM, "estop": P.MsgType.ESTOP,
                "status": P.MsgType.HEARTBEAT}[args.cmd]
        client = ControlClient(endpoint, timeout_s=args.timeout, key=args.key, server_key=server_key)
    except (ProfileError, AuthError) as exc:
        return _fail(str(exc))
    try:
        status = client.send(kind)
    except (TimeoutError, P.ProtocolError) as exc:  # ProtocolError: e.g. a node of another protocol version
        return _fail(str(exc))
    finally:
        client.close()
    print(json.dumps(status))
    return 0


def calibrate(args) -> int:
    from qsm_robot.calibrate.measure import CalibrateOptions, calibrate, summary
    from qsm_robot.calibrate.record import CalibrationError
    from qsm_robot.export.contract import ContractError
    from qsm_robot.serve.profile import ProfileError

    if not Path(args.model).is_file():
        return _fail(f"model {args.model} does not exist (write one with qsm-export)")
    out = args.out or Path("calib") / f"{args.name}.json"
    if out.exists() and not args.overwrite:
        return _fail(f"{out} exists: pass --overwrite to replace it, or pick another --name")
    opts = CalibrateOptions(name=args.name, out=out, latency_calls=args.latency_calls, budget_margin=args.budget_margin,
                            min_budget_margin=args.min_budget_margin, max_budget_fraction=args.max_budget_fraction,
                            episodes=args.episodes, episode_steps=args.episode_steps, seed=args.seed, robot=args.robot,
                            external_seconds=args.seconds, robot_key=args.robot_key, obs_margin=args.obs_margin,
                            delta_quantile=args.delta_quantile, delta_margin=args.delta_margin,
                            allow_remote=args.allow_remote)
    try:
        record = calibrate(args.model, args.profile, opts)
    except (CalibrationError, ProfileError, ContractError, ValueError) as exc:
        return _fail(str(exc))
    record.save(out)
    print(summary(record, out))
    return 0


def profile(args) -> int:
    from qsm_robot.export.contract import ContractError
    from qsm_robot.export.runtime import make_session, read_contract
    from qsm_robot.files import atomic_write_text
    from qsm_robot.serve.new_profile import dumps, starting_profile
    from qsm_robot.serve.profile import Profile, ProfileError

    out = Path(args.out or f"deploy/profiles/{args.name}.json")
    if out.exists() and not args.overwrite:
        return _fail(f"{out} exists: edit it, or pass --overwrite to replace it")
    if not Path(args.model).is_file():
        return _fail(f"model {args.model} does not exist (write one with qsm-export)")
    try:
        io = read_contract(make_session(args.model)).io
    except ContractError as exc:
        return _fail(str(exc))
    except Exception as exc:  # onnxruntime's load errors
        return _fail(f"cannot load {args.model}: {type(exc).__name__}: {exc}")
    data, notes = starting_profile(io, args.name)
    if args.ipc:
        folder = Path(args.ipc).resolve()
        data["endpoints"] = {k: f"ipc://{folder}/{k}.sock" for k in ("state", "command", "control")}
    try:
        Profile.from_dict(json.loads(json.dumps(data)))  # what is written loads
    except ProfileError as exc:
        return _fail(f"internal: the starting profile does not validate: {exc}")
    atomic_write_text(out, dumps(data))
    print(f"{PROG}: wrote {out} for {io.task} ({io.obs_dim} observations, {io.act_dim} actuators "
          f"{', '.join(io.action_names)})")
    for note in notes:
        print(f"  {note}")
    return 0


def keygen(args) -> int:
    from qsm_robot.serve.auth import AuthError, generate_keypair

    try:
        public, secret = generate_keypair(args.dir, args.name, overwrite=args.overwrite)
    except AuthError as exc:
        return _fail(str(exc))
    print(f"{PROG}: wrote {public} (public: copy it to the node's allowed_clients folder, or give it to clients "
          f"as the server key) and {secret} (secret, mode 0600: keep it on this machine)")
    return 0


def plot(args) -> int:
    from qsm_robot.serve.telemetry import plot_histogram

    try:
        png = plot_histogram(Path(args.record))
    except Exception as exc:  # not a file, not MCAP, not a node's record
        return _fail(f"cannot read the flight record {args.record}: {type(exc).__name__}: {exc}")
    if png is None:
        return _fail("matplotlib is not installed here: pip install matplotlib")
    print(png)
    return 0


def main(argv: list[str] | None = None) -> int:
    from qsm_robot.calibrate.measure import CalibrateOptions

    p = argparse.ArgumentParser(prog=PROG, description="Real-time ZeroMQ control node for an exported ONNX policy.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the control node")
    r.add_argument("--model", required=True, help="ONNX policy written by qsm-export")
    r.add_argument("--profile", required=True, help="deployment profile JSON")
    r.add_argument("--arm", action="store_true", help="arm at start (otherwise send ARM with 'qsm-serve arm')")
    r.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C/SIGTERM)")
    r.add_argument("--seed", type=int, default=0, help="seed of the policy's noise stream")
    r.add_argument("--record-dir", default="runs/serve", help="where the flight record and histogram go")
    r.add_argument("--calibration", help="calibration record (calib/NAME.json) for this model and profile")
    r.add_argument("--allow-remote", action="store_true",
                   help="allow non-loopback endpoints without CURVE keys (prints a warning)")
    r.add_argument("--inject-spike-every", type=int, default=0, metavar="N",
                   help="fault injection (campaigns): stall every Nth policy call by --inject-spike-ms")
    r.add_argument("--inject-spike-ms", type=float, default=0.0, metavar="MS", help="length of an injected stall")
    r.set_defaults(func=run)
    for name in ("arm", "disarm", "estop", "status"):
        sent = "HEARTBEAT (a status request)" if name == "status" else name.upper()
        c = sub.add_parser(name, help=f"send {sent} to a running node and print the STATUS it answers with")
        c.add_argument("--profile", help="profile whose control endpoint to use")
        c.add_argument("--endpoint", help="control endpoint (instead of --profile)")
        c.add_argument("--timeout", type=float, default=1.0)
        c.add_argument("--key", help="your CURVE key pair (.key_secret) when the node uses CURVE")
        c.add_argument("--server-key", help="the node's public key (.key); default: the profile's curve.server_public_key")
        c.set_defaults(func=control)
    pr = sub.add_parser("profile", help="write a starting deployment profile from a model's I/O description")
    pr.add_argument("--model", required=True, help="ONNX policy written by qsm-export")
    pr.add_argument("--name", required=True, help="profile name")
    pr.add_argument("--out", type=Path, help="where to write it (default deploy/profiles/NAME.json)")
    pr.add_argument("--ipc", metavar="DIR", help="endpoints as ipc:// sockets in DIR instead of loopback TCP ports")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing file")
    pr.set_defaults(func=profile)
    cal = sub.add_parser("calibrate", help="measure latency and envelope on this host; write calib/NAME.json")
    cal.add_argument("--model", required=True, help="ONNX policy written by qsm-export")
    cal.add_argument("--profile", required=True, help="deployment profile JSON")
    cal.add_argument("--name", required=True, help="record name (letters, digits, '.', '_', '-')")
    cal.add_argument("--out", type=Path, help="where to write the record (default calib/NAME.json)")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing record")
    cal.add_argument("--latency-calls", type=int, default=2000, help="policy calls timed, one per control period")
    cal.add_argument("--budget-margin", type=float, default=CalibrateOptions.budget_margin,
                     help="latency budget = p99.9 x this (default: %(default)s)")
    cal.add_argument("--min-budget-margin", type=float, default=CalibrateOptions.min_budget_margin,
                     help="where p99.9 x --budget-margin does not fit --max-budget-fraction of the period, the budget "
                          "is cut to fit if it still leaves p99.9 x this, else refused (default: %(default)s)")
    cal.add_argument("--max-budget-fraction", type=float, default=CalibrateOptions.max_budget_fraction,
                     help="the budget's most of the control period (default: %(default)s)")
    cal.add_argument("--episodes", type=int, default=3, help="closed-loop episodes for the envelope")
    cal.add_argument("--episode-steps", type=int, help="override the profile's robot.episode_steps")
    cal.add_argument("--seed", type=int, default=0, help="robot and noise seed of the episodes")
    cal.add_argument("--robot", choices=("sim", "external"), default="sim",
                     help="'sim': start qsm-sim here; 'external': a robot node is already running")
    cal.add_argument("--seconds", type=float, default=30.0, help="recording time with --robot external")
    cal.add_argument("--robot-key", help="CURVE key pair for the qsm-sim started here")
    cal.add_argument("--obs-margin", type=float, default=0.1, help="widen observed ranges by this part of the span")
    cal.add_argument("--delta-quantile", type=float, default=99.9, help="percentile of observed command changes")
    cal.add_argument("--delta-margin", type=float, default=1.2, help="rate limit = that percentile x this")
    cal.add_argument("--allow-remote", action="store_true", help="allow non-loopback endpoints without CURVE keys")
    cal.set_defaults(func=calibrate)
    kg = sub.add_parser("keygen", help="write a CURVE key pair (NAME.key, NAME.key_secret)")
    kg.add_argument("--dir", required=True, help="folder for the key files")
    kg.add_argument("--name", required=True, help="key name, e.g. node, robot, operator")
    kg.add_argument("--overwrite", action="store_true")
    kg.set_defaults(func=keygen)
    pl = sub.add_parser("plot", help="draw the latency histogram of a node's flight record")
    pl.add_argument("record", help="flight-TIME.mcap written by qsm-serve run")
    pl.set_defaults(func=plot)
    args = p.parse_args(argv)
    if args.cmd in ("arm", "disarm", "estop", "status") and not (args.profile or args.endpoint):
        p.error("give --profile or --endpoint")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
