"""Run a sweep's trials on Ray Tune; each trial is an ordinary qsm-train run directory.

The driver (:func:`run_sweep`) starts a local Ray (or joins a cluster by address), hands Tune
the trials that are not finished yet, and shows one status line for the whole sweep. A trial
(:func:`train_trial`, run by a Ray worker) creates its run directory with ``prepare_run_dir``
and trains with ``Trainer`` exactly as ``qsm-train`` does; when the directory already holds a
config.json it resumes from the latest checkpoint instead. So a trial that dies is retried by
Tune (``FailureConfig(max_failures)``) from its own checkpoint, and a sweep that was stopped
continues where it was: run the same command again (or ``qsm-sweep run --resume SWEEP_DIR``).
Finished trials (latest checkpoint at their total steps) are skipped without starting Ray.

Threads follow resources: a trial given C CPUs sets OMP/MKL/OpenBLAS threads and torch's
threads to max(1, floor(C)); with GPUs it trains on CUDA (Ray sets CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, TextIO

from qsm_robot.sweep.grid import (
    Resources, SweepError, Trial, checkpoint_step, is_finished, target_steps,
)

ATTEMPTS_FILE = "attempts.jsonl"
"""One JSON line per start of a trial in its run directory: attempt, pid, start_step, resumed."""
TRIAL_LOG = "trial.log"
"""A trial's own output (eval lines, warnings), appended to across attempts."""
CRASH_ENV = "QSM_SWEEP_TEST_CRASH_ONCE"
"""Test hook: trial names (comma-separated, or *) whose process exits once after its first checkpoint."""
_CRASH_MARKER = ".sweep-test-crashed"


def trial_threads(cpus: float) -> int:
    """Torch and BLAS threads for a trial given ``cpus`` CPUs (fractions round down, at least 1)."""
    return max(1, math.floor(cpus + 1e-9))


def trial_device(gpus: float) -> str:
    """The device of a trial given ``gpus`` GPUs: Ray makes its share visible as CUDA."""
    return "cuda" if gpus > 0 else "cpu"


def trial_params(trial: Trial, resources: Resources) -> dict[str, Any]:
    """What the trial function needs, as plain data for Tune's param space."""
    crash = {n.strip() for n in os.environ.get(CRASH_ENV, "").split(",") if n.strip()}
    return {
        "name": trial.name, "run_dir": str(trial.run_dir), "config": trial.config.to_dict(),
        "cpus": resources.cpus_per_trial, "gpus": resources.gpus_per_trial,
        "crash_once": "*" in crash or trial.name in crash,
    }


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The trial's attempts (ATTEMPTS_FILE), oldest first."""
    try:
        lines = (run_dir / ATTEMPTS_FILE).read_text().splitlines()
    except OSError:
        return []
    attempts = []
    for line in lines:
        try:
            attempts.append(json.loads(line))
        except ValueError:  # empty, or cut short by a kill while it was written
            continue
    return attempts


# --- the trial (runs in a Ray worker) ----------------------------------------------------------
def train_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable: create or resume the trial's run directory and train it."""
    params = config["trial"]
    threads = trial_threads(params["cpus"])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)  # before torch's first import in this worker, where it is one

    from ray import tune

    from qsm_robot.config import TrainConfig
    from qsm_robot.files import atomic_write_text
    from qsm_robot.train.checkpoint import has_checkpoint
    from qsm_robot.train.loop import Trainer, prepare_run_dir

    run_dir = Path(params["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt = len(read_attempts(run_dir)) + 1
    device = trial_device(params["gpus"])
    with open(run_dir / TRIAL_LOG, "a", buffering=1) as log, redirect_stdout(log), redirect_stderr(log):
        if (run_dir / "config.json").is_file():  # started before: continue from its checkpoint
            cfg = TrainConfig.load(run_dir / "config.json", threads=threads, device=device)
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
            resume = True
        else:
            cfg = TrainConfig.from_dict({**params["config"], "threads": threads, "device": device})
            prepare_run_dir(cfg)
            resume = False

        def on_eval(row: dict[str, Any]) -> None:
            tune.report({"step": row["step"], "frames": row["step"] * cfg.action_repeat,
                         "eval_return": row["return_mean"], "time_s": row["time_s"]})
            marker = run_dir / _CRASH_MARKER
            if params.get("crash_once") and has_checkpoint(run_dir) and not marker.exists():
                marker.touch()
                print(f"{CRASH_ENV}: exiting the trial process at step {row['step']}", flush=True)
                os._exit(3)

        trainer = Trainer(cfg, run_dir, resume=resume, on_eval=on_eval)
        record = {"attempt": attempt, "pid": os.getpid(), "start_step": trainer.step,
                  "resumed": resume and not trainer.started_over, "threads": threads, "device": device,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(run_dir / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"qsm-sweep: attempt {attempt} of {params['name']} starts at step {trainer.step} of {cfg.steps} "
              f"({threads} threads, {device})", flush=True)
        result = trainer.run()
    if result.step < cfg.steps:
        raise RuntimeError(f"{params['name']} stopped at step {result.step} of {cfg.steps}")


# --- the driver's progress line ----------------------------------------------------------------
def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def make_progress_callback(trials: list[Trial], skipped: int, stream: TextIO, every_s: float | None = None):
    """A Tune callback that shows the whole sweep on one status line (or a line a minute off a tty)."""
    from ray import tune

    class SweepProgress(tune.Callback):
        def __init__(self) -> None:
            self.tty = stream.isatty()
            self.every_s = every_s if every_s is not None else (1.0 if self.tty else 60.0)
            self.by_name = {t.name: t for t in trials}
            self.total_steps = {t.name: target_steps(t) for t in trials}
            self.steps = {t.name: checkpoint_step(t.run_dir) for t in trials}
            self.start_progress = sum(self.steps.values())
            self.t0 = time.monotonic()
            self.last_print, self.last_counts, self.retries = 0.0, None, 0
            self.completed: set[str] = set()
            self.stopped: set[str] = set()
            """Trials Tune ended before they finished: the sweep was interrupted (Ctrl-C)."""
            self.counts = {"running": 0, "failed": 0, "pending": len(trials)}

        @staticmethod
        def _name(trial) -> str:
            return trial.config["trial"]["name"]

        def _say(self, text: str) -> None:
            stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            stream.flush()

        def line(self) -> str:
            c = self.counts
            done_steps = sum(min(v, self.total_steps[k]) for k, v in self.steps.items())
            total = sum(self.total_steps.values())
            elapsed = time.monotonic() - self.t0
            rate = (done_steps - self.start_progress) / elapsed if elapsed > 0 else 0.0
            eta = _clock((total - done_steps) / rate) if rate > 0 else "-"
            retried = f", {self.retries} retried" if self.retries else ""
            stopped = f", {len(self.stopped)} stopped" if self.stopped else ""
            return (f"sweep: {len(self.completed) + skipped}/{len(trials) + skipped} done, {c['running']} running, "
                    f"{c['failed']} failed, {c['pending']} pending{retried}{stopped} | "
                    f"{100 * done_steps / max(total, 1):.0f}% of steps done | {_clock(elapsed)} elapsed, ETA {eta}")

        def render(self, force: bool = False) -> None:
            now = time.monotonic()
            key = (*self.counts.values(), len(self.completed), len(self.stopped))
            if not force and now - self.last_print < self.every_s and (self.tty or key == self.last_counts):
                return
            self.last_print, self.last_counts = now, key
            if self.tty:
                stream.write("\r\033[K" + self.line())
            else:
                stream.write(self.line() + "\n")
            stream.flush()

        def on_step_end(self, iteration, trials, **info) -> None:
            for t in trials:  # TERMINATED: finished, or stopped by an interrupt (Ctrl-C) before that
                name = self._name(t)
                if t.status == "TERMINATED" and name not in self.completed and name not in self.stopped:
                    if is_finished(self.by_name[name]):
                        self.completed.add(name)
                        self.steps[name] = self.total_steps[name]
                    else:
                        self.stopped.add(name)
            status = [t.status for t in trials]
            self.counts = {"running": status.count("RUNNING"), "failed": status.count("ERROR"),
                           "pending": status.count("PENDING") + status.count("PAUSED")}
            self.render()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if "step" in result:
                self.steps[self._name(trial)] = int(result["step"])

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            name = self._name(trial)
            self.retries += 1
            self.steps[name] = checkpoint_step(self.by_name[name].run_dir)
            self._say(f"qsm-sweep: trial {name} died; retrying it from its checkpoint at step {self.steps[name]}")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            name = self._name(trial)
            self._say(f"qsm-sweep: trial {name} failed for good (log: {self.by_name[name].run_dir / TRIAL_LOG})")

        def on_experiment_end(self, trials, **info) -> None:
            self.on_step_end(0, trials)
            self.render(force=True)
            if self.tty:
                stream.write("\n")
                stream.flush()

    return SweepProgress()


# --- the driver --------------------------------------------------------------------------------
def init_ray(address: str | None, num_cpus: float | None, num_gpus: float | None) -> None:
    """Start a local Ray (no dashboard, worker output kept out of the terminal) or join ``address``."""
    import ray

    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                                  configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)


def check_cluster(resources: Resources) -> None:
    """Refuse per-trial resources that no node of the running Ray could ever give."""
    import ray

    have = ray.cluster_resources()
    if resources.cpus_per_trial > have.get("CPU", 0):
        raise SweepError(f"cpus_per_trial: {resources.cpus_per_trial:g} per trial, but Ray has {have.get('CPU', 0):g} CPUs")
    if resources.gpus_per_trial > have.get("GPU", 0):
        raise SweepError(f"gpus_per_trial: {resources.gpus_per_trial:g} per trial, but Ray has {have.get('GPU', 0):g} GPUs")


def run_trials(sweep_dir: Path, trials: list[Trial], resources: Resources, skipped: int,
               stream: TextIO, progress_every_s: float | None = None) -> tuple[dict[str, str], set[str]]:
    """Run ``trials`` on the connected Ray with Tune.

    Returns ({trial name: error} for those that failed for good, names of those stopped unfinished
    because the sweep was interrupted).
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy output, silent at verbose=0
    from ray import tune

    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # our status line and summary say it
    trainable = tune.with_resources(train_trial, {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial})
    name_of = lambda trial: trial.config["trial"]["name"]  # noqa: E731
    progress = make_progress_callback(trials, skipped, stream, progress_every_s)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([trial_params(t, resources) for t in trials])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=resources.max_concurrent or None,
            trial_name_creator=name_of, trial_dirname_creator=name_of,
        ),
        run_config=tune.RunConfig(
            name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str((sweep_dir / "tune").resolve()),
            failure_config=tune.FailureConfig(max_failures=resources.max_failures),
            verbose=0,
            callbacks=[progress],
        ),
    )
    results = tuner.fit()  # on Ctrl-C Tune stops the trials and returns
    errors = {}
    for result in results:
        if result.error is not None:
            first_line = (str(result.error).strip().splitlines() or [""])[0]
            errors[result.config["trial"]["name"]] = f"{type(result.error).__name__}: {first_line}"
    return errors, progress.stopped


def pending_trials(trials: list[Trial]) -> tuple[list[Trial], list[Trial]]:
    """(finished, to run)."""
    finished = [t for t in trials if is_finished(t)]
    return finished, [t for t in trials if not is_finished(t)]


def run_sweep(sweep_dir: Path, trials: list[Trial], resources: Resources, *, address: str | None = None,
              num_cpus: float | None = None, num_gpus: float | None = None,
              stream: TextIO | None = None, progress_every_s: float | None = None) -> int:
    """Run every unfinished trial; print a summary. Returns 0 when all are finished, 130 when the
    sweep was interrupted (Ctrl-C), 1 when trials failed.

    Local resources are checked before Ray starts (SweepError naming the field). Progress and
    the summary go to ``stream`` (default stderr).
    """
    stream = stream or sys.stderr
    finished, todo = pending_trials(trials)
    if not todo:
        print(f"qsm-sweep: all {len(trials)} trials of {sweep_dir} are finished; nothing to run "
              f"(report: qsm-sweep report {sweep_dir})", file=stream)
        return 0
    if not address:
        from qsm_robot.config import available_cpus

        num_cpus = num_cpus if num_cpus is not None else available_cpus()
        if resources.cpus_per_trial > num_cpus:
            raise SweepError(f"cpus_per_trial: {resources.cpus_per_trial:g} per trial, but the local Ray has "
                             f"{num_cpus:g} CPUs (--num-cpus)")
        if resources.gpus_per_trial > 0:
            if num_gpus is None:
                import torch

                num_gpus = torch.cuda.device_count()
            if resources.gpus_per_trial > num_gpus:
                raise SweepError(f"gpus_per_trial: {resources.gpus_per_trial:g} per trial, but this machine has "
                                 f"{num_gpus:g} GPUs (--num-gpus)")
    resumed = sum((t.run_dir / "config.json").is_file() for t in todo)
    print(f"qsm-sweep: {len(todo)} of {len(trials)} trials to run ({resumed} resume from their checkpoints, "
          f"{len(finished)} finished), {resources.cpus_per_trial:g} CPU and {resources.gpus_per_trial:g} GPU "
          f"per trial, on {'Ray at ' + address if address else 'a local Ray'}", file=stream)

    import ray

    init_ray(address, num_cpus, num_gpus)
    stopped: set[str] = set()
    try:
        check_cluster(resources)
        errors, stopped = run_trials(sweep_dir, todo, resources, skipped=len(finished), stream=stream,
                                     progress_every_s=progress_every_s)
    except KeyboardInterrupt:  # a second Ctrl-C, while Tune was stopping
        errors, stopped = {}, {t.name for t in todo}
    finally:
        ray.shutdown()
    errors.update({name: "stopped: the sweep was interrupted" for name in stopped if name not in errors})
    code = summarize(sweep_dir, trials, errors, stream)
    return 130 if code and stopped else code


def summarize(sweep_dir: Path, trials: list[Trial], errors: dict[str, str], stream: TextIO) -> int:
    """Print what is finished and what is not (from the run directories); 0 when all finished."""
    unfinished = [t for t in trials if not is_finished(t)]
    retried = sum(max(0, len(read_attempts(t.run_dir)) - 1) for t in trials)
    print(f"qsm-sweep: {len(trials) - len(unfinished)}/{len(trials)} trials finished"
          + (f" ({retried} restarts from a checkpoint)" if retried else "") + f"; trials in {sweep_dir / 'trials'}",
          file=stream)
    for t in unfinished:
        why = errors.get(t.name, "not finished")
        print(f"  {t.name}: at step {checkpoint_step(t.run_dir)} of {target_steps(t)}; {why}; log {t.run_dir / TRIAL_LOG}",
              file=stream)
    if unfinished:
        print(f"qsm-sweep: continue with: qsm-sweep run --resume {sweep_dir}", file=stream)
        return 1
    print(f"qsm-sweep: report: qsm-sweep report {sweep_dir}", file=stream)
    return 0
