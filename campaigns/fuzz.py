"""Fuzz campaign: malformed and adversarial messages against a running qsm-serve node.

    python -m campaigns.fuzz [--model deploy/models/cartpole-ref-k1.onnx] [--messages 100000] [--seed 0]
                             [--rate 100] [--max-delta 0.2] [--burst 16] [--shared-robot] [--work-dir DIR]

(from the repository root; ``python campaigns/fuzz.py`` works too). The attack classes and their
frames are in campaigns/attacks.py, the checks on the node's commands in campaigns/invariants.py;
this module runs them.

Starts ``qsm-serve run --arm`` (harness.start_serve) on the model with a profile derived from
deploy/profiles/cartpole-sim.json (private ipc:// endpoints in the work folder, no calibration
record, the rate limiter ON at 10% of the actuator range unless --max-delta says otherwise, the
control-period check off at rates other than the profile's), a legitimate robot (qsm-sim via
harness.start_sim: a fresh run for each class, or one for all with --shared-robot), and, in this
process:

* a monitor: a SUB socket on the node's command endpoint that receives every COMMAND and checks
  it: one frame of the protocol, ``act_dim`` finite values within the profile's action bounds,
  and for two consecutive commands of the node's stream (no seq missing) whose
  later one is not flagged SAFE (CommandFlag bit 1: safe-stop and e-stop commands bypass the rate
  limit by design), ``|delta| <= max_delta_per_tick + 1e-6``. A failed check is a *violation*.
  Pairs with an unexplained seq gap are not checked (their exceedances are in the totals). It
  also counts, as a finding and not a violation, commands answering the robot's consecutive seqs
  r-1 and r (what the robot applies on consecutive ticks) that differ by more than the limit
  (``robot_view_exceed``): answered attacker states interleave with the robot's and each takes a
  rate-limit step of its own.
* attackers: an XPUB with NODROP (a PUB whose send blocks instead of dropping, so every frame
  reaches the node's socket and a flood leaves no backlog behind) connected to the node's state
  endpoint (its SUB takes several publishers), and a DEALER connected to its control endpoint
  (plus a DEALER of its own for oversize frames: the node's ROUTER, MAXMSGSIZE 4096, drops that
  connection on each).

Attack classes (one table row each, ``--classes`` picks some): on the state channel random bytes,
truncated frames, wrong magic, wrong version, unknown type, count/length mismatch, wrong payload
sizes (obs_dim +- k), NaN, +-inf, +-1e30 and float32 max, denormals, replayed and out-of-order
sequence numbers, a race for the robot's next seq with a spoofed observation, absurd seq (2**63,
2**64-1, 2**63 + random), absurd t_ns (far future, far past), COMMAND/STATUS/HEARTBEAT frames,
oversize frames (16 KiB to 1 MiB), one garbage frame right after each command (s_sync_garbage),
and two floods (garbage; valid-looking states); on the control channel random bytes, bad
headers, multi-part messages, wrong types (STATE/COMMAND/STATUS), HEARTBEATs with a payload,
oversize frames and a HEARTBEAT flood. States that must be evaluated to test the safety chain
(wrong sizes, NaN, inf, 1e30, denormals, t_ns) carry the restart flag with seq 0, as any peer of
the unauthenticated state channel can. Well-formed ARM, DISARM and ESTOP are never sent by the
attacker: they are operator commands, authenticated with CURVE where the node is reachable beyond
the host (covered by tests/test_auth.py); this campaign is about what an unauthenticated peer's
bytes do. The campaign's own operator socket sends HEARTBEAT and, after a safe-stop, ARM.

Pacing: classes that are not floods send up to ``--burst`` messages right after every
PACED_EVERY-th command to the robot (or after 1.5 periods without one), spread over at least
``--min-class-s``, so that the robot's states still reach the node: its state socket conflates
(only the newest frame waits), so frames that arrive while the node is busy replace each other
inside ZeroMQ (the counter deltas show how many the node read). Floods send as fast as the node's
sockets take them for at least ``--flood-s`` (and at least their share of messages). Messages are
split over the classes by weight, at least MIN_PER_CLASS each, ``--messages`` in all (floods add
more). Seeded (``--seed``).

Measured after each class: the node process alive (a *crash*: it exited, its status says FAULT,
it stopped answering, or its summary counts internal errors), its state and counter deltas
(STATUS), the monitor's violations, the loop rate under attack (``cmds_per_s`` the node sent;
``legit_per_s`` and ``legit_frac`` of them answering the robot's states, per nominal period;
``policy_frac`` with the policy's command, neither fallback nor safe) and the node's RSS; with a
robot run per class, the robot's report (``robot_fresh``: ticks with a fresh command;
``robot_wd_ticks``: ticks on its watchdog's safe command). A safe-stop during a class is a
finding (availability, not safety): the node is re-armed; if the robot then still gets no policy
command (the node takes its states for replayed or stale), that is a finding too and only a robot
restart (its first state resets the node's stream) ends it. A baseline with no attack comes first.

At the end the node gets SIGTERM; its summary-*.json (replayed, internal errors) and flight
record (commands computed from the race class's spoofed observation) are read. Prints the tables
and totals, writes benchmarks/results/fuzz_<time>.csv (and fuzz_<time>_robot.csv), keeps the work
folder (profile, node logs, robot reports, flight record), exits 1 on a crash or a violation.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python campaigns/fuzz.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import fields as dc_fields
from pathlib import Path

import numpy as np
import zmq

from campaigns.attacks import ATTACK_REFS, ATTACKS, CLASS_NAMES, FLOODS, MARKER, U32, Attack, Gen, allocate
from campaigns.harness import (DEFAULT_MODEL, REPO, RESULTS, ControlClient, Drain, P, ipc_endpoints, load_inputs,
                               print_table, rss_kib, serve_summary, start_serve, start_sim, status, terminate,
                               wait_ready, write_csv, write_json)
from campaigns.invariants import RateCheck, command_problem, computed_from
from qsm_robot.serve.flight_record import node_ticks
from qsm_robot.serve.profile import Profile

BASE_PROFILE = REPO / "deploy" / "profiles" / "cartpole-sim.json"
NOT_POLICY = int(P.CommandFlag.FALLBACK | P.CommandFlag.SAFE)
"""COMMAND flags of a command that is not the policy's (a fallback or the node's safe command)."""
PACED_EVERY = 2
"""Paced classes burst after every 2nd command to the robot (s_sync_garbage sends one frame after
every command)."""
COUNTERS = ("malformed", "state_invalid", "ticks", "stale", "fallbacks", "rate_clamped", "bounds_clamped", "misses",
            "action_invalid", "wrong_version", "restarts", "seq_gaps", "superseded", "replayed", "clock_jumps")
COLUMNS = ["class", "channel", "messages", "seconds", "msg_per_s", "alive", "state_after", "violations",
           "rate_checked", "cmds_per_s", "legit_per_s", "legit_frac", "policy_frac", "robot_fresh", "robot_wd_ticks",
           "d_malformed", "d_wrong_version", "d_state_invalid", "d_ticks", "d_restarts", "d_superseded",
           "d_stale", "d_fallbacks", "d_rate_clamped", "d_misses", "robot_view_exceed", "rss_mib", "expect_ok", "notes"]
ROBOT_COLUMNS = ["run", "classes", "steps", "achieved_hz", "fresh_frac", "on_time_frac", "late", "one_tick_late",
                 "watchdog_trips", "watchdog_ticks", "rejected", "safe_from_node"]


# --- the monitor ---------------------------------------------------------------------------------
class Monitor(threading.Thread):
    """Receives every COMMAND the node publishes; checks frames and bounds as they come
    (invariants.command_problem), rates later (invariants.RateCheck). Also what the attacks and
    the pacing read: the robot's newest seq, and a trigger on each command that answers it."""

    def __init__(self, ctx: zmq.Context, endpoint: str, low, high):
        super().__init__(name="fuzz-monitor", daemon=True)
        self.low, self.high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)  # never drop: the rate check needs every command
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.cmds: list[tuple] = []
        """(node t_ns, seq, ref, flags, values) per command, in arrival order."""
        self.bad: list[tuple[int, str]] = []
        """(node t_ns or 0, reason) per command that failed the frame, size, finite or bounds check."""
        self.cond = threading.Condition()
        self.triggers = 0
        self.last_ref = 0
        """The robot's newest seq, as answered by the node (reset when a robot run starts)."""
        self.spoofed: set[int] = set()
        """Refs of answers to the attacker's states that look like the robot's (race, absurd seq)."""
        self._halt = False

    def stop(self) -> None:
        self._halt = True
        self.join(timeout=2.0)
        self.sock.close(0)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._halt:
            if not poller.poll(20):
                continue
            while True:
                try:
                    raw = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._take(raw)

    def _take(self, raw: bytes) -> None:
        try:
            msg = P.decode(raw)
        except P.ProtocolError as exc:
            self.bad.append((P.now_ns(), f"undecodable command frame: {exc}"))
            return
        if msg.type != P.MsgType.COMMAND:
            self.bad.append((msg.t_ns, f"{msg.type.name} on the command channel"))
            return
        c = msg.payload.astype(np.float64)
        problem = command_problem(c, self.low, self.high, msg.seq)
        if problem is not None:
            self.bad.append((msg.t_ns, problem))
        self.cmds.append((msg.t_ns, msg.seq, msg.ref, msg.flags, c))
        # The robot's seqs grow by one a period: a far jump is the answer to a forged seq.
        if msg.ref not in ATTACK_REFS and (self.last_ref == 0 or msg.ref <= self.last_ref + 1000):
            with self.cond:
                self.last_ref = max(self.last_ref, msg.ref)
                self.triggers += 1
                self.cond.notify_all()

    def wait_trigger(self, seen: int, timeout_s: float) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.triggers != seen, timeout=timeout_s)
            return self.triggers

    def policy_commands_since(self, t_ns: int, exclude: set) -> int:
        """Commands after t_ns that answer the robot with the policy's action (no fallback, not safe)."""
        n = 0
        for t, _, ref, flags, _ in reversed(self.cmds[-5000:]):
            if t <= t_ns:
                break
            n += (flags & NOT_POLICY) == 0 and ref not in ATTACK_REFS and ref not in exclude
        return n

    def wait_policy(self, n: int, since_ns: int, timeout_s: float, exclude: set) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.policy_commands_since(since_ns, exclude) >= n:
                return True
            time.sleep(0.02)
        return False


# --- sockets and processes -------------------------------------------------------------------------
class Attacker:
    """The attacker's DEALER on the control channel: sends raw frames (multi-part ones too) and
    counts the node's STATUS replies. A send the node's socket does not take within 2 s raises
    zmq.Again. (The campaign's own operator is a qsm_robot.serve.client.ControlClient.)"""

    def __init__(self, ctx: zmq.Context, endpoint: str, opts: dict | None = None):
        self.sock = ctx.socket(zmq.DEALER)
        for opt, value in {zmq.LINGER: 0, zmq.RCVHWM: 0, zmq.SNDTIMEO: 2000, **(opts or {})}.items():
            self.sock.setsockopt(opt, value)
        self.sock.connect(endpoint)
        self.replies = 0
        self.seq = 10**9  # the barrier's HEARTBEATs; the attacker's frames carry other seqs

    def send(self, f: bytes | list[bytes]) -> None:
        (self.sock.send_multipart if isinstance(f, list) else self.sock.send)(f)

    def _take(self, raw: bytes) -> P.Message | None:
        try:
            msg = P.decode(raw)
        except P.ProtocolError:
            return None
        if msg.type == P.MsgType.STATUS:
            self.replies += 1
        return msg

    def drain(self) -> None:
        while True:
            try:
                self._take(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    def barrier(self, timeout_s: float) -> bool:
        """A HEARTBEAT of our own, answered within ``timeout_s``: the node has read everything this
        connection sent before it. False if no answer came."""
        self.seq += 1
        self.sock.send(P.encode(P.MsgType.HEARTBEAT, self.seq))
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(max(1, int(left * 1000))):
                break
            msg = self._take(self.sock.recv())
            if msg is not None and msg.type == P.MsgType.STATUS and msg.ref == self.seq:
                return True
        return False

    def close(self) -> None:
        self.sock.close(0)


class Node:
    """qsm-serve as a child process (harness.start_serve), its output read by a harness.Drain."""

    def __init__(self, model: Path, profile_path: Path, record_dir: Path, control: str):
        self.proc = start_serve(model, profile_path, record_dir)
        wait_ready(control, self.proc, timeout_s=120)
        self.drain = Drain(self.proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def transitions(self, since_ns: int, until_ns: int) -> list[str]:
        """The node's state changes logged in that time ('RUNNING -> SAFE_STOP: reason')."""
        return [line.split("qsm-serve: ", 1)[1] for t, line in list(self.drain.lines)
                if since_ns <= t <= until_ns and " -> " in line and line.startswith("qsm-serve: ")]

    def stop(self) -> int | None:
        terminate(self.proc, 60)
        self.drain.wait()
        return self.proc.returncode


class Robot:
    """qsm-sim runs (harness.start_sim), one after another; each leaves its RobotReport."""

    def __init__(self, profile_path: Path, scenario_path: Path, work: Path):
        self.profile_path, self.scenario_path, self.work = profile_path, scenario_path, work
        self.proc = None
        self.runs: list[dict] = []
        self.label = ""
        self.classes: list[str] = []

    def start(self, label: str) -> None:
        self.label, self.classes = label, []
        self.results = self.work / f"robot-{len(self.runs) + 1}.json"
        self.proc = start_sim(self.profile_path, self.scenario_path, self.results, quiet=True)

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        terminate(self.proc, 30)
        self.proc = None
        report = json.loads(self.results.read_text()) if self.results.is_file() else {}
        steps = report.get("steps", 0)
        applied, one_late = report.get("commands_applied", 0), report.get("commands_one_tick_late", 0)
        run = {"run": self.label, "classes": " ".join(self.classes) or "-", "steps": steps,
               "achieved_hz": round(report.get("achieved_rate_hz", 0.0), 2),
               "fresh_frac": round(applied / steps, 4) if steps else None,
               "on_time_frac": round((applied - one_late) / steps, 4) if steps else None,
               "late": report.get("commands_late"), "one_tick_late": one_late,
               "watchdog_trips": report.get("watchdog_trips"), "watchdog_ticks": report.get("watchdog_ticks"),
               "rejected": report.get("commands_rejected"), "safe_from_node": report.get("safe_commands_from_node")}
        if "watchdog_clear_t_ns" in report:  # trips not followed by fresh commands again before the run ended
            run["_wd_open"] = report["watchdog_trips"] - len(report["watchdog_clear_t_ns"])
        self.runs.append(run)
        return run


# --- the campaign ---------------------------------------------------------------------------------
def build_profile(rate_hz: float, endpoints: dict, max_delta: float | None) -> dict:
    """cartpole-sim.json with private endpoints, the given rate, no calibration, the rate limiter on."""
    data = json.loads(BASE_PROFILE.read_text())
    names = {f.name for f in dc_fields(Profile)}
    period_ms = 1e3 / rate_hz
    data.update(name=f"fuzz-{rate_hz:g}hz", rate_hz=rate_hz, endpoints=endpoints)
    if rate_hz != Profile.load(BASE_PROFILE).rate_hz:
        data["check_control_period"] = False
    data["latency_budget_ms"] = min(float(data.get("latency_budget_ms", 2.0)), 0.5 * period_ms)
    if "require_calibration" in names:
        data["require_calibration"] = False
    data.pop("curve", None)
    span = np.array(data["policy"]["action_high"], float) - np.array(data["policy"]["action_low"], float)
    if max_delta is None:
        data["max_delta_per_tick"] = data.get("max_delta_per_tick") or [round(float(x), 6) for x in 0.1 * span]
    else:
        data["max_delta_per_tick"] = [float(max_delta)] * len(span) if max_delta > 0 else None
    return data


class Campaign:
    """One campaign's node, robot, monitor and sockets, and its steps: ``baseline()``, then
    ``attack()`` for each class (each returns the class's row), ``close()``, then ``result()``."""

    def __init__(self, model: Path, work: Path, endpoints: dict, profile_path: Path, scenario_path: Path,
                 rng: np.random.Generator, *, burst: int, flood_s: float, min_class_s: float, robot_per_class: bool,
                 log):
        self.model, self.work, self.endpoints, self.profile_path = model, work, endpoints, profile_path
        self.profile = Profile.load(profile_path)
        self.burst, self.flood_s, self.min_class_s, self.robot_per_class, self.log = (
            burst, flood_s, min_class_s, robot_per_class, log)
        self.period_s = 1.0 / self.profile.rate_hz
        self.record_dir = work / "rec"
        self.ctx = zmq.Context()
        log(f"fuzz: starting qsm-serve on {model} ({self.profile.rate_hz:g} Hz, max_delta_per_tick "
            f"{self.profile.max_delta_per_tick}) in {work}")
        self.node = Node(model, profile_path, self.record_dir, endpoints["control"])
        self.nodes = [self.node]
        self.monitor = Monitor(self.ctx, endpoints["command"], self.profile.action_low, self.profile.action_high)
        self.monitor.start()
        self.spoofed = self.monitor.spoofed
        self.rates = RateCheck(self.profile.max_delta_per_tick)
        self.operator = ControlClient(endpoints["control"], timeout_s=1.0)
        self.attacker = Attacker(self.ctx, endpoints["control"])
        # An XPUB with NODROP is a PUB whose send blocks (up to SNDTIMEO) instead of dropping at the
        # high-water mark: every frame sent reaches the node's socket, and a flood runs at the rate
        # the node's socket takes frames, with no backlog left over after the class.
        self.pub = self.ctx.socket(zmq.XPUB)
        for opt, value in {zmq.LINGER: 0, zmq.SNDHWM: 1000, zmq.XPUB_NODROP: 1, zmq.SNDTIMEO: 2000}.items():
            self.pub.setsockopt(opt, value)
        self.pub.connect(endpoints["state"])
        self.robot = Robot(profile_path, scenario_path, work)
        self.gen = Gen(rng, self.profile.obs_dim, self.profile.act_dim, self.monitor)
        self._bad_done = 0

    # --- what the steps share ----------------------------------------------------------------------
    def status(self, timeout_s: float = 5.0) -> dict | None:
        """The node's status (HEARTBEAT on the operator's connection); None if it exited or did not answer."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                return self.operator.send(P.MsgType.HEARTBEAT)
            except TimeoutError:
                if not self.node.alive():
                    return None
        return None

    def window(self, t0: int, t1: int) -> dict:
        """The loop rate between two times: commands sent, those answering the robot, with the policy's action."""
        cmds = [c for c in self.monitor.cmds[-50_000:] if t0 <= c[0] <= t1]
        legit = [c for c in cmds if c[2] not in ATTACK_REFS and c[2] not in self.spoofed]
        policy = sum(1 for c in legit if c[3] & NOT_POLICY == 0)
        secs, nominal = max(1e-9, (t1 - t0) / 1e9), max(1e-9, (t1 - t0) / 1e9 * self.profile.rate_hz)
        return {"cmds_per_s": round(len(cmds) / secs, 1), "legit_per_s": round(len(legit) / secs, 1),
                "legit_frac": round(len(legit) / nominal, 3), "policy_frac": round(policy / nominal, 3)}

    def bounds_violations(self) -> list[str]:
        """The monitor's frame, size, finite and bounds failures not reported yet."""
        new = self.monitor.bad[self._bad_done:]
        self._bad_done += len(new)
        return [why for _, why in new]

    def wait_loop(self, n: int, timeout_s: float) -> tuple[bool, int]:
        """Until the robot gets n policy commands: (it did, times the node was re-armed from SAFE_STOP)."""
        since, end, rearmed = P.now_ns(), time.monotonic() + timeout_s, 0
        while time.monotonic() < end:
            if self.monitor.wait_policy(n, since, timeout_s=0.25, exclude=self.spoofed):
                return True, rearmed
            s = self.status()
            if s is not None and s["node_state"] == "SAFE_STOP":
                status(self.endpoints["control"], P.MsgType.ARM, timeout_s=2.0)  # an operator's ARM
                rearmed += 1
        return False, rearmed

    def start_robot(self, label: str, timeout_s: float = 30.0) -> bool:
        """Start a robot run; re-arm the node if it safe-stopped while no robot ran (that is expected)."""
        self.rates.robot_starts.append(P.now_ns())
        self.monitor.last_ref = 0
        self.spoofed.clear()
        self.robot.start(label)
        return self.wait_loop(10, timeout_s)[0]

    def checks(self) -> tuple[dict, list[str]]:
        """The invariants on the commands received since the last call: the rate checks
        (invariants.RateCheck) and the frame, size, finite and bounds failures."""
        return self.rates.run(self.monitor.cmds), self.bounds_violations()

    # --- the steps ---------------------------------------------------------------------------------
    def baseline(self, baseline_s: float) -> dict:
        """The robot alone for ``baseline_s``: the loop rate with no attack."""
        if not self.start_robot("baseline"):
            raise RuntimeError("the robot got no policy command within 30 s of its start: the loop does not run")
        before = self.status()
        t0 = P.now_ns()
        time.sleep(baseline_s)
        t1 = P.now_ns()
        after = self.status()
        rate, viol = self.checks()
        row = {"class": "baseline", "channel": "-", "messages": 0, "seconds": round((t1 - t0) / 1e9, 2),
               "msg_per_s": 0, "alive": self.node.alive(), "state_after": after["node_state"] if after else "NO REPLY",
               "violations": len(viol) + rate["rate_viol"], "rate_checked": rate["rate_checked"],
               **self.window(t0, t1), **{f"d_{k}": int(after[k] - before[k]) for k in COUNTERS if after and before},
               "robot_view_exceed": rate["robot_view_exceed"], "rss_mib": round(rss_kib(self.node.proc.pid) / 1024, 1),
               "expect_ok": True, "notes": "; ".join(viol[:2] + rate["examples"][:2]),
               "_unverified_exceed": rate["rate_unverified_exceed"]}
        self.robot.classes.append("baseline")
        base_run = self.robot.stop()
        row.update(robot_fresh=base_run["fresh_frac"], robot_wd_ticks=base_run["watchdog_ticks"])
        return row

    def attack(self, attack: Attack, n: int) -> dict:
        """One attack class of n messages (floods: at least flood_s long); the node recovered after it."""
        notes: list[str] = []
        if self.robot_per_class and not self.start_robot(attack.name):
            raise RuntimeError(f"the robot got no policy command within 30 s of its start before {attack.name}")
        self.robot.classes.append(attack.name)
        before = self.status()
        if before is None:
            raise RuntimeError(f"the node does not answer before {attack.name}")
        self.log(f"fuzz: {attack.name}: {n} messages ({attack.mode}) on the {attack.channel} channel")
        replies0 = self.attacker.replies
        sent, t0, t1 = self._send(attack, n, notes)
        time.sleep(max(0.05, 5 * self.period_s))  # the conflated last frame is evaluated at most half a period later
        self.attacker.drain()
        replies = self.attacker.replies - replies0
        # A barrier: the node has read everything the attacker's connection sent before.
        if attack.channel == "control" and not self.attacker.barrier(timeout_s=10.0):
            notes.append("no reply on the attacker's connection after the class")
        after = self.status()
        alive = self.node.alive() and after is not None and after["node_state"] != "FAULT"
        rss = round(rss_kib(self.node.proc.pid) / 1024, 1) if self.node.alive() else None
        row = {"class": attack.name, "channel": attack.channel, "messages": sent,
               "seconds": round((t1 - t0) / 1e9, 2), "msg_per_s": round(sent / max(1e-9, (t1 - t0) / 1e9)),
               "alive": alive,
               "state_after": after["node_state"] if after else ("EXITED" if not self.node.alive() else "NO REPLY"),
               **self.window(t0, t1)}
        if after is not None:
            row.update({f"d_{k}": int(after[k] - before[k]) for k in COUNTERS})
        if attack.channel == "control":
            notes.append(f"{replies} STATUS replies")
        self._recover(attack, row, after, notes, t0)
        rate, viol = self.checks()
        row.update(violations=len(viol) + rate["rate_viol"], rate_checked=rate["rate_checked"],
                   robot_view_exceed=rate["robot_view_exceed"], rss_mib=rss,
                   _unverified_exceed=rate["rate_unverified_exceed"])
        notes += viol[:3] + rate["examples"][:3]
        if rate["robot_view_exceed"]:
            notes.append("FINDING commands answering the robot's consecutive seqs differ by more than "
                         f"max_delta_per_tick, e.g. {rate['robot_view_examples'][0]}")
        row["expect_ok"] = after is not None and attack.expect(row)
        if not row["expect_ok"]:
            notes.append(f"expected {attack.expect_text}")
        row["notes"] = "; ".join(notes)
        self.log(f"fuzz: {attack.name}: alive {alive}, {row['state_after']}, violations {row['violations']}, "
                 f"legit {row['legit_frac']}, malformed +{row.get('d_malformed')}, invalid "
                 f"+{row.get('d_state_invalid')}{'; ' + row['notes'] if row['notes'] else ''}")
        return row

    def _send(self, attack: Attack, n: int, notes: list[str]) -> tuple[int, int, int]:
        """Send the class's messages; returns (messages sent, start and end times)."""
        big = big_pub = None
        if attack.mode == "oversize" and attack.channel == "control":
            big = Attacker(self.ctx, self.endpoints["control"], {zmq.RECONNECT_IVL: 5})
        if attack.mode == "oversize" and attack.channel == "state":
            # A connection of its own: ZeroMQ closes the connection that sent an oversize frame.
            big_pub = self.ctx.socket(zmq.PUB)
            big_pub.setsockopt(zmq.LINGER, 0)
            big_pub.setsockopt(zmq.RECONNECT_IVL, 5)
            big_pub.connect(self.endpoints["state"])
            time.sleep(0.1)
        if attack.channel == "state":
            send = (big_pub if big_pub is not None else self.pub).send
        else:
            send = (big if big is not None else self.attacker).send
        sent = 0
        t0 = P.now_ns()
        try:
            if attack.mode == "flood":
                pool = [attack.make(self.gen) for _ in range(min(n, 1024))]
                end_ns = t0 + int(self.flood_s * 1e9)
                while sent < n or P.now_ns() < end_ns:
                    send(pool[sent % len(pool)])
                    sent += 1
                    if attack.channel == "control" and sent % 64 == 0:
                        self.attacker.drain()
            else:
                for k in self._bursts(attack, n):
                    for _ in range(k):
                        send(attack.make(self.gen))
                        sent += 1
                    if attack.channel == "control":
                        self.attacker.drain()
        except zmq.Again:
            notes.append(f"FINDING send blocked for 2 s after {sent} messages (the node's socket took no more)")
        finally:
            t1 = P.now_ns()
            if big is not None:
                big.close()
            if big_pub is not None:
                big_pub.close(0)
        return sent, t0, t1

    def _bursts(self, attack: Attack, n: int):
        """The sizes of a paced class's bursts, each yielded when it is due: after every ``every``-th
        command to the robot (or 1.5 periods without one), k messages a burst, spread over at least
        min_class_s (a loop rate needs periods); n messages in all."""
        every = 1 if attack.mode in ("race", "sync") else PACED_EVERY
        bursts = max(1, int(self.min_class_s * self.profile.rate_hz / every))
        k = 1 if attack.mode in ("race", "sync") else min(self.burst, max(1, -(-n // bursts)))
        seen, last_send, count, left = self.monitor.triggers, 0.0, 0, n
        while left > 0:
            new = self.monitor.wait_trigger(seen, 1.5 * self.period_s)
            count, seen = (count + new - seen if new != seen else every), new
            if count < every:
                continue
            count = 0
            if attack.mode == "race":
                if time.monotonic() - last_send < 0.9 * self.period_s:
                    continue
                last_send = time.monotonic()
            size = min(k, left)
            left -= size
            yield size

    def _recover(self, attack: Attack, row: dict, after: dict | None, notes: list[str], t0: int) -> None:
        """After a class: restart a crashed node, re-arm a safe-stopped one, restart the robot if it
        gets no policy command; the robot's report (its run per class) and the node's state changes
        into the row and its notes."""
        if not row["alive"]:
            notes.append("CRASH: " + ("process exited" if not self.node.alive() else
                                      "FAULT" if after and after["node_state"] == "FAULT" else "no status reply"))
            self.log(f"fuzz: {attack.name}: the node crashed; restarting it")
            self.node.stop()
            self.node = Node(self.model, self.profile_path, self.record_dir, self.endpoints["control"])
            self.nodes.append(self.node)
        ok, rearmed = self.wait_loop(5, max(1.0, 100 * self.period_s))
        if rearmed:
            notes.append(f"re-armed {rearmed}x after SAFE_STOP")
        if not ok:
            notes.append(f"FINDING the robot got no policy command within {max(1.0, 100 * self.period_s):g} s after "
                         "the class (the node takes its states for replayed or stale): only a robot restart "
                         "(its first state resets the node's stream) ends this")
        t_end = P.now_ns()
        if self.robot_per_class:
            run = self.robot.stop()
            row.update(robot_fresh=run["fresh_frac"], robot_wd_ticks=run["watchdog_ticks"])
            if run["watchdog_trips"]:
                notes.append(f"robot watchdog: {run['watchdog_trips']} trip(s), {run['watchdog_ticks']} of "
                             f"{run['steps']} ticks on its safe command")
            if run.get("_wd_open"):
                notes.append("FINDING the robot was still on its watchdog when its run ended, though the node "
                             "answered its states with policy commands after the class")
        elif not ok:
            self.robot.stop()
            if not self.start_robot(f"restarted after {attack.name}"):
                notes.append("FINDING no recovery even after the robot restarted")
        for tr in dict.fromkeys(self.node.transitions(t0, t_end)):
            if tr.split(":", 1)[0].rsplit("-> ", 1)[-1] in ("SAFE_STOP", "FAULT"):
                notes.insert(0, f"FINDING {tr}")

    def close(self) -> tuple[list[int | None], dict]:
        """Stop the robot and the node(s); returns the nodes' exit codes and the last rate checks."""
        self.robot.stop()
        codes = [nd.stop() for nd in self.nodes]
        time.sleep(0.2)
        final = self.rates.run(self.monitor.cmds)
        self.monitor.stop()
        for s in (self.operator, self.attacker):
            s.close()
        self.pub.close(0)
        self.ctx.term()
        for nd in self.nodes:
            if nd.proc.returncode is None:
                nd.proc.kill()
        return codes, final

    def result(self, rows: list[dict], codes: list[int | None], final: dict) -> dict:
        """The node logs written, its summaries and flight record read, the totals."""
        for i, nd in enumerate(self.nodes):
            (self.work / f"serve-{i + 1}.log").write_text("\n".join(line for _, line in nd.drain.lines) + "\n")
        summaries = [serve_summary(p) for p in sorted(self.record_dir.glob("summary-*.json"))]
        summary = summaries[-1] if summaries else {}
        internal_errors = sum(s.get("internal_errors", 0) for s in summaries)
        spoofed_answered = 0
        flights = sorted(self.record_dir.glob("flight-*.mcap"))
        if flights:
            spoofed_answered = computed_from(node_ticks(flights[-1]), np.resize(MARKER, self.profile.obs_dim))
        for r in rows:
            if r["class"] == "s_seq_race_spoof":
                found = (f"FINDING {spoofed_answered} commands computed from the spoofed observation answered the "
                         "robot's seqs (flight record)")
                r["notes"] = "; ".join(filter(None, [r["notes"], found]))
        late_viol = len(self.bounds_violations()) + final["rate_viol"]
        crash_rows = sum(not r["alive"] for r in rows)  # each restarted the node; the last node must exit 0
        crashes = crash_rows + (codes[-1] != 0) + (internal_errors > 0 and crash_rows == 0)
        violations = sum(r["violations"] for r in rows) + late_viol
        attack_rows = [r for r in rows if r["class"] != "baseline"]
        totals = {
            "messages": sum(r["messages"] for r in rows), "classes": len(attack_rows), "crashes": crashes,
            "flood_messages": sum(r["messages"] for r in rows if r["class"] in FLOODS),
            "violations": violations, "rate_checked": sum(r["rate_checked"] for r in rows) + final["rate_checked"],
            "rate_unverified_exceed": sum(r["_unverified_exceed"] for r in rows) + final["rate_unverified_exceed"],
            "robot_view_exceed": sum(r["robot_view_exceed"] for r in rows) + final["robot_view_exceed"],
            "expect_failed": [r["class"] for r in rows if not r["expect_ok"]],
            "internal_errors": internal_errors, "exit_codes": codes, "replayed": summary.get("replayed"),
            "safe_stops": summary.get("safe_stops"), "spoofed_answered": spoofed_answered,
            "classes_with_safe_stop": [r["class"] for r in rows if "-> SAFE_STOP" in r.get("notes", "")],
            "resyncs": summary.get("resyncs"), "clock_jumps": summary.get("clock_jumps"),
            "baseline_legit_frac": rows[0]["legit_frac"] if rows else None,
            "min_legit_frac": min((r["legit_frac"] for r in attack_rows), default=None),
            "baseline_policy_frac": rows[0]["policy_frac"] if rows else None,
            "min_policy_frac": min((r["policy_frac"] for r in attack_rows), default=None),
            "final_state": summary.get("final_state"),
        }
        for r in rows:
            r.pop("_unverified_exceed", None)
        for r in self.robot.runs:
            r.pop("_wd_open", None)
        return {"rows": rows, "robot": self.robot.runs, "summary": summary, "totals": totals}


def run_campaign(model: str | Path, work_dir: str | Path, messages: int = 100_000, seed: int = 0,
                 rate_hz: float = 100.0, *, max_delta: float | None = None, burst: int = 16,
                 baseline_s: float = 3.0, flood_s: float = 1.0, classes: list[str] | None = None,
                 robot_per_class: bool = True, min_class_s: float = 1.0,
                 log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Run the campaign; returns {"rows": one per class (baseline first), "robot": the robot's runs,
    "summary": the node's summary JSON, "totals": {...}, "profile": the profile used}.

    robot_per_class: a fresh robot run for each class (its report is the class's ``robot_fresh``
    and ``robot_wd_ticks``; about 1.5 s more a class), else one run for all of them, restarted
    only when the node no longer serves it."""
    model, work = Path(model), Path(work_dir)
    if not model.is_file():
        raise FileNotFoundError(f"model {model} does not exist")
    work.mkdir(parents=True, exist_ok=True)
    sock_dir = work if len(str(work)) < 80 else Path(tempfile.mkdtemp(prefix="qsm-fuzz-"))
    endpoints = ipc_endpoints(sock_dir)
    prof = build_profile(rate_hz, endpoints, max_delta)
    profile_path = write_json(work / "profile.json", prof)
    scenario_path = write_json(work / "scenario.json",
                               {"name": "fuzz-robot", "seed": seed, "episodes": 100_000, "faults": {}})
    unknown = set(classes or ()) - set(CLASS_NAMES)
    if unknown:
        raise ValueError(f"unknown attack classes {sorted(unknown)}; known: {CLASS_NAMES}")
    attacks = [a for a in ATTACKS if classes is None or a.name in classes]
    counts = allocate(messages, attacks)
    c = Campaign(model, work, endpoints, profile_path, scenario_path, np.random.default_rng(seed), burst=burst,
                 flood_s=flood_s, min_class_s=min_class_s, robot_per_class=robot_per_class, log=log)
    rows: list[dict] = []
    try:
        rows.append(c.baseline(baseline_s))
        if not robot_per_class and not c.start_robot("under attack"):
            raise RuntimeError("the robot got no policy command within 30 s of its restart")
        for attack in attacks:
            rows.append(c.attack(attack, counts[attack.name]))
    finally:
        codes, final = c.close()
    return {**c.result(rows, codes, final), "profile": prof}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX policy (default: %(default)s)")
    p.add_argument("--messages", type=int, default=100_000, help="messages in all, split over the classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=100.0, help="control rate of the node and the robot (Hz)")
    p.add_argument("--max-delta", type=float, help="max_delta_per_tick for every actuator (0: rate limiter off; "
                                                     "default: the profile's, else 10%% of the range)")
    p.add_argument("--burst", type=int, default=16, help="messages sent right after each of the robot's commands")
    p.add_argument("--baseline-s", type=float, default=3.0, help="seconds of the no-attack baseline")
    p.add_argument("--flood-s", type=float, default=1.0, help="a flood lasts at least this long")
    p.add_argument("--min-class-s", type=float, default=1.0,
                   help="other classes spread their messages over at least this long (at most --burst a period)")
    p.add_argument("--classes", nargs="+", choices=CLASS_NAMES, metavar="CLASS", help="run only these classes")
    p.add_argument("--shared-robot", action="store_true",
                   help="one robot run for all classes (faster; no per-class robot report)")
    p.add_argument("--work-dir", type=Path, help="profile, sockets, robot reports, flight record (default: a temp dir)")
    a = p.parse_args(argv)
    load_inputs("fuzz", a.model, BASE_PROFILE)
    if a.messages < 1 or a.burst < 1 or not 1 <= a.rate <= 1000:
        print("fuzz: error: --messages and --burst must be >= 1, --rate in [1, 1000] (the profile's range)", file=sys.stderr)
        return 2
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="qsm-fuzz-"))
    result = run_campaign(a.model, work, a.messages, a.seed, a.rate, max_delta=a.max_delta, burst=a.burst,
                          baseline_s=a.baseline_s, flood_s=a.flood_s, classes=a.classes,
                          robot_per_class=not a.shared_robot, min_class_s=a.min_class_s)
    rows, t = result["rows"], result["totals"]
    print(f"## qsm-serve fuzz campaign: {a.model.name}, {a.rate:g} Hz, max_delta_per_tick "
          f"{result['profile']['max_delta_per_tick']}, seed {a.seed}\n")
    print_table(rows, COLUMNS)
    print("\n## the robot (qsm-sim reports)\n")
    print_table(result["robot"], ROBOT_COLUMNS)
    print(f"\nTOTAL {t['messages']} messages ({t['flood_messages']} of them in floods) in {t['classes']} classes: "
          f"crashes {t['crashes']}, violations {t['violations']} (rate pairs checked {t['rate_checked']}; pairs "
          f"with an unexplained seq gap over the limit {t['rate_unverified_exceed']}); internal errors "
          f"{t['internal_errors']}, node exit codes {t['exit_codes']}, counter expectations failed "
          f"{t['expect_failed'] or 'none'}")
    print(f"loop rate: the robot's states answered {t['baseline_legit_frac']} per period at baseline "
          f"({t['baseline_policy_frac']} with the policy's command), {t['min_legit_frac']} "
          f"({t['min_policy_frac']}) in the worst class")
    print(f"findings: safe-stops in {t['classes_with_safe_stop'] or 'no class'}; commands over the limit on the "
          f"robot's consecutive seqs {t['robot_view_exceed']}; commands computed from spoofed observations that "
          f"answered the robot's seqs {t['spoofed_answered']}; node counted replayed {t['replayed']}, safe-stops "
          f"{t['safe_stops']} (one per robot run change is expected), resyncs {t['resyncs']}, clock jumps "
          f"{t['clock_jumps']}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"fuzz_{stamp}.csv"
    ordered = [{**{c: r.get(c) for c in COLUMNS}, **r} for r in rows]  # the table's columns first
    write_csv(out, ordered + [{"class": "TOTAL", **{k: v for k, v in t.items() if not isinstance(v, list)}}])
    write_csv(RESULTS / f"fuzz_{stamp}_robot.csv", result["robot"])
    print(f"\nwrote {out} and {out.with_name(f'fuzz_{stamp}_robot.csv')}; work folder {work}")
    return 1 if t["crashes"] or t["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
