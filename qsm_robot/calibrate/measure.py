"""``qsm-serve calibrate``: measure this host and this model, write ``calib/<name>.json``.

1. Latency: the policy runs through the node's own runner (the tuned onnxruntime session and its
   budget watchdog) ``calls`` times after warm-up, paced at the profile's rate as in service (an
   idle core wakes slowly, so a tight loop would flatter the host). Proposed budget: p99.9 times
   ``budget_margin``, at most ``max_budget_fraction`` of the control period (the rest of the
   period is for the network and the robot): past it the budget is cut to that part of the period
   as long as it still leaves p99.9 x ``min_budget_margin``, and refused below that.
2. Envelope: closed-loop episodes against a robot node (``qsm-sim`` started here, or a robot
   already connected to the profile's endpoints) with the rate limiter and the envelope off, the
   bounds on. Observation ranges: observed min/max widened by ``obs_margin`` of the span on each
   side. Command change limit, per actuator: the ``delta_quantile`` percentile of per-tick changes
   between consecutive policy commands (and from the safe command to the first policy command, the
   change arming makes) times ``delta_margin``, between 0.1% and 100% of the actuator range.
3. The record, bound to the model's SHA-256 and the profile's calibration basis.

No torch and no mujoco in this process: the simulated robot is a separate process.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsm_robot.calibrate.record import CalibrationError, CalibrationRecord, SafetyValues, file_sha256
from qsm_robot.serve.profile import Profile, check_contract
from qsm_robot.serve.protocol import NodeState, TickFlag
from qsm_robot.serve.telemetry import percentiles

FALLBACK_BIT = int(TickFlag.FALLBACK)
UNUSABLE_BITS = int(TickFlag.STATE_INVALID | TickFlag.STALE)


@dataclass
class CalibrateOptions:
    name: str
    """Record name: written to calib/<name>.json unless out is given."""
    out: Path | None = None
    latency_calls: int = 2000
    """Policy calls measured, after warmup calls."""
    warmup: int = 200
    budget_margin: float = 2.0
    """Budget = p99.9 of the measured latency times this."""
    min_budget_margin: float = 1.5
    """Where p99.9 x budget_margin exceeds max_budget_fraction of the period, the budget is cut to
    that part of the period if it still leaves p99.9 x this (the record says so, and by how much);
    below this headroom the calibration is refused. A shared host's tail is its stalls (this VM
    class: paced p99.9 from 0.7 to 5 ms in back-to-back runs of 500 calls of one 40-us model), so
    a fixed margin on it decides the outcome more than the model does."""
    min_budget_ms: float = 0.2
    """Never propose a budget below this (scheduler noise is larger than a fast model)."""
    max_budget_fraction: float = 0.5
    """The budget never exceeds this fraction of the control period."""
    episodes: int = 3
    """Closed-loop episodes for the envelope."""
    episode_steps: int | None = None
    """Override of the profile's robot.episode_steps."""
    seed: int = 0
    robot: str = "sim"
    """'sim': start qsm-sim here; 'external': a robot node is already running on the profile's endpoints."""
    external_seconds: float = 30.0
    """With an external robot: how long to record."""
    robot_key: str | None = None
    """CURVE key pair for the qsm-sim started here (profiles with a curve section)."""
    obs_margin: float = 0.1
    delta_quantile: float = 99.9
    delta_margin: float = 1.2
    allow_remote: bool = False

    def validate(self) -> "CalibrateOptions":
        checks = [
            (self.latency_calls >= 100, "latency_calls", "must be >= 100"),
            (self.budget_margin >= 1.0, "budget_margin", "must be >= 1"),
            (1.0 <= self.min_budget_margin <= self.budget_margin, "min_budget_margin",
             f"must be in [1, budget_margin = {self.budget_margin}]"),
            (0 < self.max_budget_fraction < 1, "max_budget_fraction", "must be in (0, 1)"),
            (self.episodes >= 1, "episodes", "must be >= 1"),
            (self.robot in ("sim", "external"), "robot", "must be 'sim' or 'external'"),
            (self.obs_margin >= 0, "obs_margin", "must be >= 0"),
            (50 <= self.delta_quantile <= 100, "delta_quantile", "must be in [50, 100]"),
            (self.delta_margin >= 1.0, "delta_margin", "must be >= 1"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise CalibrationError(f"calibrate: {name}: {rule}, got {getattr(self, name)!r}")
        return self


def measure_latency(model: Path, profile: Profile, calls: int, warmup: int) -> np.ndarray:
    """Microseconds per policy call through the node's runner, one call per control period."""
    from qsm_robot.serve.policy_runner import PolicyRunner

    runner = PolicyRunner(model, warmup=warmup)
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((calls, profile.obs_dim)).astype(np.float32)
    times = np.empty(calls)
    period = int(round(1e9 / profile.rate_hz))
    deadline = time.monotonic_ns()
    try:
        for i in range(calls):
            deadline += period
            t = time.perf_counter_ns()
            if runner.run(obs[i], budget_s=profile.period_s) is None:
                raise CalibrationError("the policy failed or ran past a whole period during the latency measurement")
            times[i] = (time.perf_counter_ns() - t) / 1e3
            left = deadline - time.monotonic_ns()
            if left > 0:
                time.sleep(left / 1e9)
    finally:
        runner.close()
    return times


def propose_budget(latency_us: np.ndarray, period_s: float, opts: CalibrateOptions) -> tuple[float, dict]:
    """(budget in ms, the latency section of the record); CalibrationError if it does not fit.

    The budget is p99.9 x ``budget_margin``, cut to ``max_budget_fraction`` of the period where it
    exceeds it (``budget_capped`` in the record, with the margin left), refused where the cut would
    leave less than p99.9 x ``min_budget_margin``."""
    stats = percentiles(latency_us)
    wanted_ms = max(opts.min_budget_ms, stats["p99.9"] * opts.budget_margin / 1e3)
    limit_ms = opts.max_budget_fraction * period_s * 1e3
    needed_ms = stats["p99.9"] * opts.min_budget_margin / 1e3
    if needed_ms > limit_ms:
        raise CalibrationError(
            f"latency: p99.9 {stats['p99.9']:.0f} us x the least margin {opts.min_budget_margin} = {needed_ms:.3f} ms "
            f"does not fit the control period: at {1 / period_s:g} Hz the budget may use at most "
            f"{opts.max_budget_fraction:.0%} of {period_s * 1e3:.3f} ms = {limit_ms:.3f} ms. Use a faster host or "
            "model (fewer sampler steps), or a lower rate; on a busy host, measure again when it is quieter.")
    rounded_ms = float(np.ceil(wanted_ms * 100) / 100)  # whole 10-us steps: readable, never below the product
    capped = rounded_ms > limit_ms
    budget_ms = limit_ms if capped else rounded_ms
    section = {"calls": int(len(latency_us)), "paced_hz": round(1 / period_s, 3),
               **{f"{k}_us": round(v, 1) for k, v in stats.items()}, "budget_margin": opts.budget_margin,
               "min_budget_margin": opts.min_budget_margin, "min_budget_ms": opts.min_budget_ms,
               "max_budget_fraction": opts.max_budget_fraction, "budget_ms": budget_ms, "budget_capped": capped,
               "margin_left": round(budget_ms * 1e3 / stats["p99.9"], 2)}
    return budget_ms, section


def derive_envelope(obs: np.ndarray, commands: np.ndarray, consecutive: np.ndarray, action_low, action_high,
                    opts: CalibrateOptions) -> tuple[list, list, list, dict]:
    """(obs_low, obs_high, max_delta_per_tick, the envelope section of the record).

    obs: [N, obs_dim] usable states; commands: [M, act_dim] policy commands in order;
    consecutive[i]: commands[i + 1] answered the state right after the one commands[i] answered."""
    if len(obs) < 10 or consecutive.sum() < 10:
        raise CalibrationError(f"envelope: only {len(obs)} usable states and {int(consecutive.sum())} consecutive "
                               "policy commands were recorded: is the robot node running and the link healthy?")
    lo, hi = obs.min(0), obs.max(0)
    pad = np.maximum(opts.obs_margin * (hi - lo), 1e-3 * np.maximum(1.0, np.abs(lo) + np.abs(hi)))
    span = np.asarray(action_high, np.float64) - np.asarray(action_low, np.float64)
    deltas = np.abs(np.diff(commands, axis=0))[consecutive]
    observed = np.percentile(deltas, opts.delta_quantile, axis=0)
    max_delta = np.clip(observed * opts.delta_margin, 1e-3 * span, span)
    section = {"usable_states": int(len(obs)), "policy_command_pairs": int(consecutive.sum()),
               "obs_min": lo.tolist(), "obs_max": hi.tolist(), "obs_margin": opts.obs_margin,
               "delta_quantile": opts.delta_quantile, "delta_observed": observed.tolist(),
               "delta_max_observed": deltas.max(0).tolist(), "delta_margin": opts.delta_margin}
    return (lo - pad).tolist(), (hi + pad).tolist(), max_delta.tolist(), section


def command_sequence(policy_rows: np.ndarray, safe_command) -> tuple[np.ndarray, np.ndarray]:
    """(commands, consecutive) for :func:`derive_envelope` from flight rows the policy answered.

    In service the node moves from its safe command to the policy's first command when it is
    armed: that change counts as one of the observed ones (the safe command leads the sequence).
    consecutive[i]: commands[i + 1] answered the state right after the one commands[i] answered.
    """
    commands = np.vstack([np.asarray(safe_command, np.float32)[None], policy_rows["command"]])
    consecutive = np.concatenate([[len(policy_rows) > 0], np.diff(policy_rows["state_seq"].astype(np.int64)) == 1])
    return commands, consecutive


def run_closed_loop(model: Path, profile: Profile, opts: CalibrateOptions, log) -> tuple[np.ndarray, dict]:
    """Serve the policy (rate limiter and envelope off) to a robot node; return the flight rows and its report."""
    from qsm_robot.serve.node import ServeNode

    steps = opts.episode_steps or profile.robot.episode_steps
    node_profile = dataclasses.replace(profile, max_delta_per_tick=None, soft_start_ticks=0, obs_low=None,
                                       obs_high=None, require_calibration=False,
                                       flight_record_ticks=max(profile.flight_record_ticks, 2 * opts.episodes * steps))
    node = ServeNode(model, node_profile, seed=opts.seed, log=log, allow_remote=opts.allow_remote)
    node.core.arm("calibration")
    thread = threading.Thread(target=node.run, name="calibration-node", daemon=True)
    thread.start()
    report: dict = {}
    try:
        if opts.robot == "sim":
            with tempfile.TemporaryDirectory() as tmp:
                scenario, results = Path(tmp) / "scenario.json", Path(tmp) / "robot.json"
                scenario.write_text(json.dumps({"name": f"calibrate-{opts.name}", "seed": opts.seed,
                                                "episodes": opts.episodes, "episode_steps": steps}))
                profile_file = Path(tmp) / "profile.json"
                profile_file.write_text(json.dumps(profile.to_dict()))
                cmd = [sys.executable, "-m", "qsm_robot.robot.node", "--profile", str(profile_file),
                       "--scenario", str(scenario), "--results", str(results)]
                if opts.robot_key:
                    cmd += ["--key", opts.robot_key]
                log(f"qsm-serve calibrate: {opts.episodes} episode(s) of {steps} steps against qsm-sim")
                sim = subprocess.run(cmd, capture_output=True, text=True)
                if sim.returncode != 0:
                    raise CalibrationError(f"envelope: qsm-sim failed (exit {sim.returncode}): {sim.stderr.strip()[-800:]}")
                report = json.loads(results.read_text())
        else:
            log(f"qsm-serve calibrate: recording {opts.external_seconds:g} s against the robot on {profile.endpoints.state}")
            time.sleep(opts.external_seconds)
    finally:
        node.request_stop()
        thread.join(timeout=10)
        node.close()
    return node.core.recorder.data.copy(), report


def calibrate(model: str | Path, profile_path: str | Path, opts: CalibrateOptions, log=None) -> CalibrationRecord:
    """Measure, derive and return the record (not yet saved)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    from qsm_robot.export.runtime import make_session, read_contract

    opts.validate()
    model, profile = Path(model), Profile.load(profile_path)
    contract = read_contract(make_session(model))
    check_contract(profile, contract)

    log(f"qsm-serve calibrate: latency, {opts.latency_calls} calls at {profile.rate_hz:g} Hz")
    latency = measure_latency(model, profile, opts.latency_calls, opts.warmup)
    budget_ms, latency_section = propose_budget(latency, profile.period_s, opts)

    rows, report = run_closed_loop(model, dataclasses.replace(profile, latency_budget_ms=budget_ms), opts, log)
    running = rows[rows["node_state"] == int(NodeState.RUNNING)]
    usable = running[(running["flags"] & UNUSABLE_BITS) == 0]
    policy = running[(running["flags"] & (FALLBACK_BIT | UNUSABLE_BITS)) == 0]
    commands, consecutive = command_sequence(policy, profile.safe_command)
    obs_low, obs_high, max_delta, envelope = derive_envelope(usable["obs"], commands, consecutive,
                                                             profile.action_low, profile.action_high, opts)
    envelope |= {"episodes": opts.episodes, "seed": opts.seed, "robot": opts.robot,
                 "returns": [round(r, 2) for r in report.get("episodes", [])],
                 "ticks": int(len(running)), "fallbacks": int(((running["flags"] & FALLBACK_BIT) > 0).sum())}
    import onnxruntime

    return CalibrationRecord(
        name=opts.name, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host={"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
              "processor": platform.processor(), "python": platform.python_version(),
              "onnxruntime": onnxruntime.__version__},
        model={"path": str(model), "sha256": file_sha256(model), "task": contract.io.task, "sampler": contract.sampler,
               "sampler_steps": contract.sampler_steps},
        profile={"name": profile.name, "sha256": profile.fingerprint(), "basis": profile.calibration_basis()},
        latency=latency_section, envelope=envelope,
        safety=SafetyValues(latency_budget_ms=budget_ms, obs_low=obs_low, obs_high=obs_high, max_delta_per_tick=max_delta),
    ).validate()


def summary(record: CalibrationRecord, path: Path) -> str:
    lat, env, s = record.latency, record.envelope, record.safety

    def fmt(values) -> str:
        return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"

    if lat.get("budget_capped"):
        budget = (f"{s.latency_budget_ms:.2f} ms: CUT to {lat['max_budget_fraction']:.0%} of the period, p99.9 x "
                  f"{lat['margin_left']} where x {lat['budget_margin']} was asked for (this host's tail is long: "
                  "a quieter host, or a lower rate, gives the full margin)")
    else:
        budget = (f"{s.latency_budget_ms:.2f} ms (p99.9 x {lat['budget_margin']}; "
                  f"at most {lat['max_budget_fraction']:.0%} of the period)")
    rows = [
        ("record", f"{path} (schema {record.schema_version}, id {record.short_id})"),
        ("model", f"{record.model['path']} sha256 {record.model['sha256'][:12]}..."),
        ("profile", f"{record.profile['name']} basis sha256 {record.profile['sha256'][:12]}..."),
        ("policy latency", f"p50 {lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us, p99.9 {lat['p99.9_us']:.0f} us, "
                           f"max {lat['max_us']:.0f} us ({lat['calls']} calls at {lat['paced_hz']:g} Hz)"),
        ("latency budget", budget),
        ("episodes", f"{env['episodes']} ({env['ticks']} ticks), returns {env['returns']}"),
        ("obs envelope", f"low {fmt(s.obs_low)} high {fmt(s.obs_high)}"),
        ("command change", f"p{env['delta_quantile']:g} {fmt(env['delta_observed'])} x {env['delta_margin']} -> "
                           f"max_delta_per_tick {fmt(s.max_delta_per_tick)}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["== qsm-serve calibrate =="] + [f"{k:<{width}}  {v}" for k, v in rows])
