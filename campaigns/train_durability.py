"""Training durability: kill -9 qsm-train at random moments; the latest checkpoint must load and
``qsm-train --resume`` must finish the run every time.

    python -m campaigns.train_durability [--trials 20] [--seed 0] [--max-kill-s 6] [--extra-steps 200]

(from the repository root; ``python campaigns/train_durability.py`` works too).
Each trial starts ``python -m qsm_robot.cli.train --preset smoke`` (32-wide networks, a checkpoint
every 100 steps, no evaluation until the end) into a fresh run directory, sends it SIGKILL after a
random delay, then checks:

a. the latest checkpoint, if any, loads with the package's own loader (qsm_robot.train.checkpoint)
   and is the ``step_*`` folder that latest.json names, never a temporary; with no checkpoint the
   loader says so rather than reading a partial write;
b. ``qsm-train --resume RUN --steps FOUND+EXTRA`` exits 0, says it resumes at step FOUND (0 when
   there was no checkpoint) and ends with a checkpoint at FOUND+EXTRA, train.csv reading as one run
   and no temporaries left in checkpoints/.

A kill during process start-up, before config.json exists, leaves nothing to resume (the config is
unknown). There the checks are that ``--resume`` refuses with a clear message and that the original
command, run again into the same --run-dir, is not blocked and finishes (``resumed from`` reads
"new run").

Kill delays are stratified over [0, max_kill_s): one per 1/trials slice, in a seeded random order, so
every campaign covers start-up, the first checkpoint (about 3 s after start on a free 2-core
machine) and several later ones. Prints a Markdown table and a summary line, writes
benchmarks/results/train_durability_<time>.csv, and exits 1 if any trial failed.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python campaigns/train_durability.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from campaigns.harness import REPO, RESULTS, child_env, print_table, write_csv
from qsm_robot.qsm.policy import CheckpointError, load_policy
from qsm_robot.train.checkpoint import load_train_state
from qsm_robot.train.run_log import read_csv

TRAIN = [sys.executable, "-m", "qsm_robot.cli.train"]
RUN_ARGS = ["--preset", "smoke", "--threads", "1", "--checkpoint-every", "100",
            "--eval-every", "100000", "--eval-episodes", "1"]
"""Tiny networks, a checkpoint every 100 steps, one evaluation episode at the very end."""
KILL_CLOCKS = ("start", "config", "checkpoint")
COLUMNS = ["trial", "kill_s", "clock", "at_kill", "ckpt_step", "loads_ok", "temps", "resumed_from",
           "resume_rc", "final_step", "seconds", "ok", "problem"]
STEP_NAME = re.compile(r"step_\d{9}")
TEMPORARY = re.compile(r"\.tmp-step_\d{9}-\d+|\.latest\.json\.tmp-\d+")
TIMEOUT_S = 300


class TrialError(AssertionError):
    """A check of a trial that failed; the message says which."""


def train_env() -> dict[str, str]:
    """The children's environment: one thread each, unbuffered, no rendering back-end."""
    env = child_env()
    env.setdefault("MUJOCO_GL", "disable")
    return env


def start_run(run: Path, steps: int, log: Path) -> subprocess.Popen:
    """``qsm-train`` for a new run into ``run``, its stdout and stderr going to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(TRAIN + RUN_ARGS + ["--steps", str(steps), "--run-dir", str(run)],
                                cwd=REPO, env=train_env(), stdout=out, stderr=subprocess.STDOUT)


def wait_for_clock(run: Path, clock: str, proc: subprocess.Popen, timeout_s: float = TIMEOUT_S) -> None:
    """Return when the kill clock starts: at once ("start"), once config.json or the first checkpoint exists."""
    if clock == "start":
        return
    marker = run / "config.json" if clock == "config" else run / "checkpoints" / "latest.json"
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if proc.poll() is not None:
            raise TrialError(f"qsm-train exited with {proc.returncode} before its {clock}")
        if time.monotonic() > deadline:
            raise TrialError(f"no {marker.name} within {timeout_s} s")
        time.sleep(0.005)


def check_checkpoints(run: Path) -> tuple[int | None, str, int]:
    """Check what a kill left: (step of the latest checkpoint or None, "yes"/"none", temporaries)."""
    ckpt_root = run / "checkpoints"
    entries = sorted(ckpt_root.iterdir()) if ckpt_root.is_dir() else []
    strays = [p.name for p in entries if not (p.name == "latest.json" or TEMPORARY.fullmatch(p.name)
                                              or (STEP_NAME.fullmatch(p.name) and p.is_dir()))]
    if strays:
        raise TrialError(f"unexpected entries in checkpoints/: {strays}")
    temps = sum(1 for p in entries if TEMPORARY.fullmatch(p.name))
    if not (ckpt_root / "latest.json").is_file():
        try:
            ckpt, _ = load_train_state(run)
        except CheckpointError:
            return None, "none", temps  # the loader reports no checkpoint: nothing partial was taken
        raise TrialError(f"no latest.json, yet the loader read {ckpt}")
    latest = json.loads((ckpt_root / "latest.json").read_text())
    try:
        ckpt, state = load_train_state(run)
        policy_step = load_policy(run).spec.step
    except CheckpointError as exc:
        raise TrialError(f"the latest checkpoint does not load: {exc}") from exc
    if ckpt.name != latest["checkpoint"] or not STEP_NAME.fullmatch(ckpt.name):
        raise TrialError(f"the loader read {ckpt.name}, latest.json names {latest['checkpoint']}")
    if not state["step"] == policy_step == latest["step"]:
        raise TrialError(f"steps disagree: train state {state['step']}, policy {policy_step}, latest.json {latest['step']}")
    return latest["step"], "yes", temps


def check_finished(run: Path, target: int) -> int:
    """Check a run that should have ended at step ``target``; return its final checkpoint's step."""
    try:
        _, state = load_train_state(run)
        policy_step = load_policy(run).spec.step
    except CheckpointError as exc:
        raise TrialError(f"the final checkpoint does not load: {exc}") from exc
    if not state["step"] == policy_step == target:
        raise TrialError(f"final checkpoint at step {state['step']} (policy {policy_step}), expected {target}")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    if leftovers:
        raise TrialError(f"temporaries left after the resume: {leftovers}")
    log_every = json.loads((run / "config.json").read_text())["log_every"]
    logged = [int(r["step"]) for r in read_csv(run / "train.csv")]
    if logged != list(range(log_every, target + 1, log_every)):
        raise TrialError(f"train.csv does not read as one run: steps {logged}")
    return state["step"]


def run_trial(work_dir: Path, kill_after_s: float, extra_steps: int = 200, clock: str = "start") -> dict:
    """One trial in ``work_dir`` (created; the run is ``work_dir/run``): start, kill -9, check, resume.

    The kill comes ``kill_after_s`` seconds after ``clock``: the process start ("start"), config.json
    appearing ("config") or the first checkpoint ("checkpoint"). The resume asks for
    ``extra_steps`` steps past the checkpoint found. Returns a table row; ``ok`` says if all checks passed.
    """
    if clock not in KILL_CLOCKS:
        raise ValueError(f"clock must be one of {KILL_CLOCKS}, got {clock!r}")
    work_dir.mkdir(parents=True, exist_ok=True)
    run = work_dir / "run"
    row: dict = {"kill_s": round(kill_after_s, 2), "clock": clock, "ok": False}
    t0 = time.monotonic()
    proc = start_run(run, 100_000, work_dir / "killed.log")
    procs = [proc]
    try:
        wait_for_clock(run, clock, proc)
        time.sleep(kill_after_s)
        if proc.poll() is not None:
            raise TrialError(f"qsm-train exited with {proc.returncode} before the kill")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        has_config = (run / "config.json").is_file()
        row["at_kill"] = "checkpoint" if (run / "checkpoints" / "latest.json").is_file() else (
            "config.json" if has_config else "no config.json")
        found, row["loads_ok"], row["temps"] = check_checkpoints(run)
        row["ckpt_step"] = found
        target = (found or 0) + extra_steps
        if has_config:
            done = subprocess.run(TRAIN + ["--resume", str(run), "--steps", str(target)], cwd=REPO, env=train_env(),
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
            (work_dir / "resume.log").write_text(done.stdout + done.stderr)
            row["resume_rc"] = done.returncode
            said = re.search(r"resuming .* at step (\d+) of (\d+)", done.stderr)
            row["resumed_from"] = int(said.group(1)) if said else None
            if done.returncode != 0:
                raise TrialError(f"--resume exited with {done.returncode}: {done.stderr.strip()[-300:]}")
            if row["resumed_from"] != (found or 0):
                raise TrialError(f"resumed from step {row['resumed_from']}, the latest checkpoint is {found}")
        else:
            refused = subprocess.run(TRAIN + ["--resume", str(run), "--steps", str(target)], cwd=REPO,
                                     env=train_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
            if refused.returncode != 2 or "is not a run directory (no config.json)" not in refused.stderr:
                raise TrialError(f"--resume of a run without config.json: rc {refused.returncode}, {refused.stderr.strip()[-300:]}")
            row["resumed_from"] = "new run"
            again = start_run(run, target, work_dir / "rerun.log")
            procs.append(again)
            row["resume_rc"] = again.wait(timeout=TIMEOUT_S)
            if again.returncode != 0:
                raise TrialError(f"the rerun into the same --run-dir exited with {again.returncode}")
        row["final_step"] = check_finished(run, target)
        row["ok"] = True
    except (TrialError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        problem = str(exc) if isinstance(exc, TrialError) else f"{type(exc).__name__}: {exc}"
        row["problem"] = problem.replace("|", "/").replace("\n", " ")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    row["seconds"] = round(time.monotonic() - t0, 1)
    return {c: row.get(c) for c in COLUMNS if c != "trial"}


def kill_delays(trials: int, max_kill_s: float, seed: int) -> list[float]:
    """One delay in each of ``trials`` equal slices of [0, max_kill_s), in a seeded random order."""
    rng = random.Random(seed)
    delays = [(i + rng.random()) * max_kill_s / trials for i in range(trials)]
    rng.shuffle(delays)
    return delays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--max-kill-s", type=float, default=6.0, help="kills fall in [0, this) seconds after start")
    parser.add_argument("--extra-steps", type=int, default=200, help="the resume runs this many steps past the checkpoint")
    args = parser.parse_args()
    if args.trials < 1 or args.max_kill_s <= 0 or args.extra_steps < 1:
        parser.error("--trials, --max-kill-s and --extra-steps must be positive")

    work = Path(tempfile.mkdtemp(prefix="train_durability_"))
    rows = []
    for i, delay in enumerate(kill_delays(args.trials, args.max_kill_s, args.seed)):
        row = {"trial": i, **run_trial(work / f"trial_{i:02d}", delay, args.extra_steps)}
        rows.append(row)
        print(f"trial {i + 1}/{args.trials}: kill at {row['kill_s']} s, {row.get('at_kill')}, "
              f"{'ok' if row['ok'] else 'FAILED: ' + row['problem']} ({row['seconds']} s)", file=sys.stderr, flush=True)
        if row["ok"]:
            shutil.rmtree(work / f"trial_{i:02d}", ignore_errors=True)

    failures = sum(not r["ok"] for r in rows)
    print_table(rows, COLUMNS)
    print(f"\n{len(rows)} trials, {failures} failures (kills in [0, {args.max_kill_s}) s, seed {args.seed}; "
          f"{sum(r.get('at_kill') == 'checkpoint' for r in rows)} after a checkpoint)")
    path = RESULTS / f"train_durability_{time.strftime('%Y%m%d-%H%M%S')}.csv"
    write_csv(path, rows)
    print(f"wrote {path}")
    if failures:
        print(f"failed trials' run directories and logs are in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
