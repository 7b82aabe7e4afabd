"""Protocol campaign: the findings of a robot written from the version-1 document, replayed against
protocol version 2 (docs/PROTOCOL.md), each with its figures.

    python -m campaigns.protocol [--model deploy/models/cartpole-ref-k1.onnx] [--rate-hz 100] [--trials 3]

The node (``ServeNode``) runs on a thread of this process and the robot is the reference client
(``RobotClient``, a counting stand-in for physics) over private ipc endpoints, so each case can
shape the robot exactly. Cases:

1. restart at once: an armed node serves robot A; robot B starts on the same endpoints and
   publishes its first state at once (no connection wait). Pass: B is answered without an ARM
   (restart flag repeated until answered), node RUNNING, no re-sync, B applies commands on at
   least 95% of its ticks after its first answer.
2. seq past 2^32: a robot whose seqs start at 2^32 - 100. Pass: every command it applies answers
   its own seq (version 1 sent ref = seq mod 2^32), applied on at least 95% of its ticks.
3. the first ARM: a fresh node answers a running robot with safe commands, ARM comes 0.5 s in.
   Pass: states sent = ticks + superseded + seq_gaps + replayed + clock_jumps exactly, and the
   policy's commands reach the robot after the ARM.
4. late, then on time: every 10th state is sent 0.9 periods late, the next one on time. Pass:
   the on-time one is answered at once (the flood guard lets two states back to back): no late
   tick beyond the late-sent states' own (past the robot's cutoff before they are answered),
   nothing superseded.
5. forged restarts: another local process publishes restart-flagged seq-0 states at 10x the rate.
   Reported (availability costs; docs/PROTOCOL.md "What another process on the host can do"):
   the robot's fresh fraction, and `restarts` counting the forgeries. Pass: no command outside the
   bounds reaches the robot, every forgery counted (restarts > 0), the node never FAULT.
6. forged seq: another process publishes seq 2^63 states at the robot's rate. Pass: the node
   re-syncs and safe-stops (safe commands only from then on until an ARM), `replayed` and
   `resyncs` count it, and the first safe-stop comes within resync_after_rejected + 2 of the
   robot's states after the first forgery (the document's bound).

Prints a table, writes benchmarks/results/protocol_<time>.csv, exits 1 on any failure.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python campaigns/protocol.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from campaigns.harness import DEFAULT_MODEL, RESULTS, print_table, write_csv
from qsm_robot.export.runtime import make_session, read_contract
from qsm_robot.robot.client import Robot, RobotClient, RobotReport
from qsm_robot.serve import protocol as P
from qsm_robot.serve.client import ControlClient
from qsm_robot.serve.node import ServeNode
from qsm_robot.serve.profile import Profile


class Counting(Robot):
    """Zeros for observations; counts and keeps the commands applied."""

    def __init__(self, obs_dim: int, steps: int):
        self.obs_dim, self.steps, self.t, self.commands = obs_dim, steps, 0, []

    def observe(self) -> np.ndarray:
        return np.zeros(self.obs_dim, np.float32)

    def apply(self, command: np.ndarray) -> None:
        self.commands.append(command.copy())
        self.t += 1

    def episode_done(self) -> bool:
        return self.t >= self.steps


class LateEveryTenth(RobotClient):
    """Sends every 10th state 0.9 periods late; the next one goes out on its own deadline."""

    def send_state(self, obs, seq, flags):
        if seq % 10 == 0:
            time.sleep(0.9 * self.profile.period_s)
        return super().send_state(obs, seq, flags)


class Setup:
    """A node on a thread, on a private profile; robots and forgers connect to it."""

    def __init__(self, model: Path, rate_hz: float, work: Path, arm: bool = True):
        io = read_contract(make_session(model)).io
        data = {"name": "protocol-campaign", "profile_version": 2, "policy": io.to_dict(), "rate_hz": rate_hz,
                "check_control_period": False, "require_calibration": False, "latency_budget_ms": 0.5e3 / rate_hz,
                "safe_command": [0.0] * io.act_dim, "max_delta_per_tick": [2.0 * (h - lo) for lo, h in
                                                                          zip(io.action_low, io.action_high)],
                "endpoints": {k: f"ipc://{work}/{k}.sock" for k in ("state", "command", "control")}}
        self.profile = Profile.from_dict(data)
        self.node = ServeNode(model, self.profile, log=lambda m: None)
        if arm:
            self.node.core.arm("campaign")
        self.thread = threading.Thread(target=self.node.run, kwargs={"duration_s": 600.0}, daemon=True)
        self.thread.start()

    def robot(self, steps: int, cls=RobotClient, connect_wait_s: float = 0.0, first_seq: int = 1
              ) -> tuple[RobotReport, Counting]:
        robot = Counting(self.profile.obs_dim, steps)
        client = cls(self.profile, robot, log=lambda m: None)
        try:
            return client.run(episodes=1, connect_wait_s=connect_wait_s, first_seq=first_seq), robot
        finally:
            client.close()

    def close(self) -> None:
        self.node.request_stop()
        self.thread.join()
        self.node.close()


def forger(endpoint: str, make_frame, rate_hz: float, stop: threading.Event) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    k = 0
    while not stop.is_set():
        k += 1
        sock.send(make_frame(k))
        time.sleep(1.0 / rate_hz)
    sock.close(0)


def counters(core) -> dict:
    c = core.counters
    return {k: getattr(c, k) for k in ("ticks", "superseded", "seq_gaps", "replayed", "clock_jumps", "restarts",
                                       "resyncs", "safe_stops", "malformed", "wrong_version", "errors")}


def result(case: str, problems: list[str], measured: str, c: dict) -> dict:
    """One row of the table: the case, pass/fail, the figures, the node's counters."""
    return {"case": case, "passed": not problems, "measured": measured, "problems": "; ".join(problems),
            **{f"node_{k}": v for k, v in c.items()}}


def against_forger(s: Setup, make_frame, rate_hz: float, steps: int) -> tuple[RobotReport, Counting, int]:
    """A robot run while another local process publishes ``make_frame(k)`` at ``rate_hz``;
    (its report, the robot, the monotonic time the forger started)."""
    stop = threading.Event()
    f = threading.Thread(target=forger, args=(s.profile.endpoints.state, make_frame, rate_hz, stop), daemon=True)
    s.robot(20)  # the robot's stream is up before the forger starts
    t0 = time.monotonic_ns()
    f.start()
    try:
        r, robot = s.robot(steps)
    finally:
        stop.set()
        f.join()
    return r, robot, t0


def case_restart_at_once(model: Path, rate_hz: float, work: Path, steps: int = 300) -> dict:
    s = Setup(model, rate_hz, work)
    try:
        a, _ = s.robot(steps)
        b, _ = s.robot(steps)
        c = counters(s.node.core)
        state = s.node.core.state.name
    finally:
        s.close()
    after = b.steps - b.restart_flagged  # ticks after the first answer came back
    applied = (b.commands_applied - b.commands_one_tick_late) / max(1, b.steps)
    problems = []
    if c["resyncs"] or c["safe_stops"] or state != "RUNNING":
        problems.append(f"node {state}, resyncs {c['resyncs']}, safe-stops {c['safe_stops']}")
    if c["restarts"] != 2:
        problems.append(f"restarts {c['restarts']} (2 robot starts)")
    if b.commands_applied < 0.95 * after:
        problems.append(f"robot B applied {b.commands_applied} commands in {after} ticks after its first answer")
    return result("restart, publishing at once", problems,
                  f"B: restart flag on {b.restart_flagged} state(s), then {b.commands_applied}/{b.steps} ticks "
                  f"with a command ({100 * applied:.1f}% fresh); restarts {c['restarts']}, resyncs {c['resyncs']}", c)


def case_seq_past_2_32(model: Path, rate_hz: float, work: Path, steps: int = 300) -> dict:
    s = Setup(model, rate_hz, work)
    try:
        r, _ = s.robot(steps, first_seq=2**32 - 100)
        c = counters(s.node.core)
        last = s.node.core.last_state_seq
    finally:
        s.close()
    problems = []
    if r.commands_applied < 0.95 * (r.steps - r.restart_flagged):
        problems.append(f"{r.commands_applied}/{r.steps} ticks with a command")
    if last is None or last < 2**32:
        problems.append(f"the node's last seq {last} did not pass 2^32")
    return result("seqs past 2^32", problems,
                  f"seqs {2**32 - 100}..{2**32 - 101 + r.steps}: {r.commands_applied}/{r.steps} ticks with a "
                  f"command answering their own state, {r.commands_late} late", c)


def case_first_arm(model: Path, rate_hz: float, work: Path, steps: int = 300) -> dict:
    s = Setup(model, rate_hz, work, arm=False)
    control = ControlClient(s.profile.endpoints.control, timeout_s=5.0)
    timer = threading.Timer(0.5, lambda: control.send(P.MsgType.ARM))
    try:
        timer.start()
        r, robot = s.robot(steps)
        timer.join()
        time.sleep(0.1)
        c = counters(s.node.core)
    finally:
        control.close()
        s.close()
    accounted = c["ticks"] + c["superseded"] + c["seq_gaps"] + c["replayed"] + c["clock_jumps"]
    policy = sum(bool(np.any(cmd != 0)) for cmd in robot.commands)
    problems = []
    if accounted != r.states_sent:
        problems.append(f"{r.states_sent} sent, {accounted} accounted for")
    if not policy:
        problems.append("no policy command reached the robot after the ARM")
    return result("states around the first ARM", problems,
                  f"{r.states_sent} sent = {c['ticks']} answered + {c['superseded']} superseded + {c['seq_gaps']} "
                  f"gaps + {c['replayed']} replayed + {c['clock_jumps']} clock jumps; {policy} policy commands "
                  f"applied after ARM", c)


def case_late_then_on_time(model: Path, rate_hz: float, work: Path, steps: int = 300) -> dict:
    s = Setup(model, rate_hz, work)
    try:
        s.robot(20)  # connect and start the stream
        r, _ = s.robot(steps, cls=LateEveryTenth)
        c = counters(s.node.core)
    finally:
        s.close()
    # A state sent 0.9 periods late is past the robot's own cutoff (90% of the period) before it is
    # even answered: its tick is late by construction. The on-time state right after it is not.
    late_sent = steps // 10
    on_time = r.steps - late_sent
    fresh = (r.commands_applied - r.commands_one_tick_late) / max(1, on_time)
    problems = []
    if r.commands_late > late_sent + max(1, steps // 100):
        problems.append(f"{r.commands_late} late ticks for {late_sent} states sent late")
    if c["superseded"]:
        problems.append(f"{c['superseded']} states superseded")
    return result("a late state, then an on-time one", problems,
                  f"{late_sent} late/on-time pairs: fresh commands on {100 * fresh:.1f}% of the on-time "
                  f"states' ticks, {r.commands_late} late ticks ({late_sent} sent late), {c['superseded']} superseded", c)


def case_forged_restarts(model: Path, rate_hz: float, work: Path, steps: int = 300) -> dict:
    s = Setup(model, rate_hz, work)
    obs = np.zeros(s.profile.obs_dim, np.float32)
    try:
        r, robot, _ = against_forger(s, lambda k: P.encode(P.MsgType.STATE, 0, obs, flags=int(P.StateFlag.RESTART)),
                                     10 * rate_hz, steps)
        c = counters(s.node.core)
        state = s.node.core.state.name
    finally:
        s.close()
    fresh = (r.commands_applied - r.commands_one_tick_late) / max(1, r.steps)
    low, high = np.array(s.profile.action_low), np.array(s.profile.action_high)
    outside = sum(bool(np.any((cmd < low) | (cmd > high))) for cmd in robot.commands)
    problems = []
    if outside:
        problems.append(f"{outside} commands outside the bounds")
    if c["restarts"] <= 2:
        problems.append(f"restarts {c['restarts']}: the forgeries are not counted")
    if state == "FAULT" or c["errors"]:
        problems.append(f"node {state}, {c['errors']} internal errors")
    return result("forged restart flags (10x rate)", problems,
                  f"robot fresh on {100 * fresh:.1f}% of its ticks (availability cost, documented); restarts "
                  f"{c['restarts']}, superseded {c['superseded']}, node {state}", c)


def case_forged_seq(model: Path, rate_hz: float, work: Path, steps: int = 300) -> dict:
    s = Setup(model, rate_hz, work)
    obs = np.zeros(s.profile.obs_dim, np.float32)
    bound = s.profile.resync_threshold + 2
    try:
        r, robot, t0 = against_forger(s, lambda k: P.encode(P.MsgType.STATE, 2**63 + k, obs), rate_hz, steps)
        c = counters(s.node.core)
        state = s.node.core.state.name
        rows = s.node.core.recorder.data
    finally:
        s.close()
    stopped = rows[(rows["t_recv_ns"] >= t0) & (rows["node_state"] == int(P.NodeState.SAFE_STOP))]
    robot_before = None
    if len(stopped):
        first = stopped["t_recv_ns"][0]
        robot_before = int(np.sum((rows["t_recv_ns"] >= t0) & (rows["t_recv_ns"] < first) & (rows["state_seq"] < 2**62)))
    problems = []
    if not c["resyncs"] or robot_before is None:
        problems.append("no re-sync / safe-stop")
    elif robot_before > bound:
        problems.append(f"{robot_before} robot states answered before the safe-stop (bound {bound})")
    if state not in ("SAFE_STOP",):
        problems.append(f"node {state} at the end (SAFE_STOP expected until an ARM)")
    return result("forged seq 2^63 stream", problems,
                  f"safe-stop after {robot_before} robot states (bound {bound}); replayed {c['replayed']}, "
                  f"resyncs {c['resyncs']}, node {state}", c)


CASES = (case_restart_at_once, case_seq_past_2_32, case_first_arm, case_late_then_on_time, case_forged_restarts,
         case_forged_seq)


def run(model: Path, rate_hz: float, trials: int, steps: int, log=print) -> list[dict]:
    rows = []
    for trial in range(trials):
        for case in CASES:
            with tempfile.TemporaryDirectory(prefix="qsm-protocol-") as work:
                row = {"trial": trial, **case(model, rate_hz, Path(work), steps)}
            log(f"{row['case']}: {'pass' if row['passed'] else 'FAIL'}: {row['measured']} {row['problems']}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX policy (qsm-export)")
    p.add_argument("--rate-hz", type=float, default=100.0)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="robot ticks per run")
    a = p.parse_args(argv)
    if not a.model.exists():
        print(f"campaigns.protocol: error: {a.model} not found (qsm-export one, or pass --model)", file=sys.stderr)
        return 2
    rows = run(a.model, a.rate_hz, a.trials, a.steps, log=lambda m: print(m, file=sys.stderr))
    print_table(rows, ["trial", "case", "passed", "measured", "problems"])
    out = RESULTS / f"protocol_{time.strftime('%Y%m%d-%H%M%S')}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
