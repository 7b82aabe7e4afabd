"""``qsm-train``: train a diffusion policy with Q-score matching on a dm_control task.

    qsm-train --task cartpole-swingup --steps 100000 --seed 0
    qsm-train --preset fast --task walker-walk
    qsm-train --resume runs/cartpole-swingup__reference__seed0__20261121-120000 [--steps N] [--device cpu]

Every field of :class:`qsm_robot.config.TrainConfig` is a flag; ``--preset`` sets the defaults
the other flags then override. Exit codes: 0 done, 2 bad input, 128+signal when stopped by
Ctrl-C or SIGTERM (after saving a checkpoint).

``--resume`` works whenever the run directory holds its config.json: a run killed (even with
kill -9) before its first checkpoint starts again from step 0 with that config.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from qsm_robot.config import PRESETS, ConfigError, TrainConfig, preset_config, resolve_device
from qsm_robot.qsm.policy import CheckpointError

PROG = "qsm-train"


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _parse_new(argv: list[str]) -> TrainConfig:
    import tyro

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="reference")
    known, _ = pre.parse_known_args(argv)
    if known.preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {known.preset!r}; valid: {', '.join(PRESETS)}")
    description = (
        "qsm-train: train a diffusion policy with Q-score matching on a dm_control task.\n\n"
        "Start a run: qsm-train [--preset P] [--FIELD VALUE ...] (every field below).\n\n"
        "Continue a run: qsm-train --resume RUN_DIR [--steps N] [--device D] (from its latest "
        "checkpoint; only --steps and --device may change).\n\n"
        f"Presets: {', '.join(PRESETS)}. The defaults shown are those of the chosen --preset. "
        "--steps and the other step counts are policy steps (actions); the task runs "
        "steps x action_repeat frames (its own control steps), the unit of the learning curve."
    )
    return tyro.cli(TrainConfig, default=preset_config(known.preset), args=argv, prog=PROG, description=description)


def _parse_resume(argv: list[str]) -> tuple[Path, int | None, str | None]:
    parser = argparse.ArgumentParser(prog=f"{PROG} --resume", description="Continue a run where its latest checkpoint left it.")
    parser.add_argument("--resume", required=True, metavar="RUN_DIR", help="the run directory to continue")
    parser.add_argument("--steps", type=int, help="new total step count (to extend the run)")
    parser.add_argument("--device", help="device to continue on (auto, cpu, cuda); default the run's own")
    args, rest = parser.parse_known_args(argv)
    if rest:
        raise ConfigError(
            f"with --resume only --steps and --device may be given (the run's config.json holds the rest), got {' '.join(rest)}"
        )
    return Path(args.resume), args.steps, args.device


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = any(a == "--resume" or a.startswith("--resume=") for a in argv)
    try:
        if resume:
            run_dir, steps, device = _parse_resume(argv)
            if not (run_dir / "config.json").is_file():
                raise ConfigError(f"resume: {run_dir} is not a run directory (no config.json)")
            cfg = TrainConfig.load(run_dir / "config.json", steps=steps, device=device)
        else:
            cfg = _parse_new(argv).validate()
            run_dir = None
    except ConfigError as exc:
        return _fail(str(exc))

    # Imports that pull in torch, mujoco and friends come after the arguments are checked.
    from qsm_robot.files import atomic_write_text
    from qsm_robot.train.loop import RunDirError, Trainer, prepare_run_dir

    try:
        if resume:
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
            trainer = Trainer(cfg, run_dir, resume=True)
            why = " (it holds no checkpoint yet: starting it again with its config.json)" if trainer.started_over else ""
            print(f"{PROG}: resuming {run_dir} at step {trainer.step} of {cfg.steps}{why}", file=sys.stderr)
        else:
            run_dir = prepare_run_dir(cfg)
            trainer = Trainer(cfg, run_dir)
            print(f"{PROG}: {cfg.task}, preset {cfg.preset}, seed {cfg.seed}, {cfg.steps} steps on "
                  f"{resolve_device(cfg.device)}; run directory {run_dir}", file=sys.stderr)
    except (RunDirError, CheckpointError, ConfigError) as exc:
        return _fail(str(exc))

    result = trainer.run()
    resume_cmd = f"{PROG} --resume {shlex.quote(str(run_dir))}"
    if result.interrupted is not None:
        print(f"\n{PROG}: stopped at step {result.step} of {cfg.steps}; checkpoint saved. "
              f"Continue with:\n  {resume_cmd}", file=sys.stderr)
        return 128 + result.interrupted

    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    rows = [
        ("task", cfg.task), ("preset", cfg.preset), ("seed", cfg.seed), ("policy steps", result.step),
        ("frames", result.step * cfg.action_repeat),
        ("wall time", f"{result.wall_s:.0f} s"), ("updates/s", f"{result.updates_per_s:.1f}"),
        ("final eval return", fmt(result.final_eval)), ("best eval return", fmt(result.best_eval)),
        ("run directory", run_dir), ("learning curve", run_dir / "learning_curve.png"),
        ("checkpoint", run_dir / "checkpoints"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(["", "== qsm-train summary =="] + [f"{k:<{width}}  {v}" for k, v in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
