"""The training run: act, store, update, evaluate, log, checkpoint; resumable bit for bit.

Everything random is seeded from ``cfg.seed`` and saved in checkpoints (torch generators,
the numpy generator, the full state of the training env mid-episode and of the eval envs), so
``N`` steps in one go and ``N/2`` + ``--resume`` + ``N/2`` give the same weights on the CPU.
A run stopped before its first checkpoint (a kill -9 during start-up) resumes from step 0: its
config.json holds everything needed to start it again, with the same seeds, from scratch.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from qsm_robot.checkpoint_layout import CRITIC_STATE, REPLAY_STATE
from qsm_robot.config import TrainConfig, resolve_device, resolve_threads
from qsm_robot.envs import env_info, get_env_state, make_env, run_episodes, set_env_state
from qsm_robot.files import atomic_write_text
from qsm_robot.files import remove_temporaries as remove_temporary_files
from qsm_robot.policy_io import PolicyIO
from qsm_robot.qsm.learner import QSMConfig, QSMLearner
from qsm_robot.qsm.policy import PolicySpec
from qsm_robot.qsm.selection import best_of
from qsm_robot.train.checkpoint import has_checkpoint, load_train_state, remove_temporaries, save_checkpoint
from qsm_robot.train.replay import NStepReturns, ReplayBuffer
from qsm_robot.train.run_log import RunLog

SATURATED_AT = 0.99
"""An action component this close to a bound of [-1, 1] counts as saturated (eval.csv's ``saturated``)."""


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    wall_s: float
    final_eval: float | None
    best_eval: float | None
    updates_per_s: float
    interrupted: int | None
    """The signal number that stopped the run early, or None."""


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.task}__{cfg.preset}__seed{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def learner_config(cfg: TrainConfig) -> QSMConfig:
    """The learner's hyperparameters: the run configuration's fields of the same names."""
    return QSMConfig(**{f.name: getattr(cfg, f.name) for f in fields(QSMConfig)})


def policy_spec(cfg: TrainConfig, io: PolicyIO, step: int) -> PolicySpec:
    return PolicySpec(
        io=io, hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers, time_dim=cfg.time_dim,
        fourier_dim=cfg.fourier_dim, schedule=cfg.schedule, diffusion_steps=cfg.diffusion_steps,
        temperature=cfg.temperature, clip_sample=cfg.clip_sample, step=step,
    )


class Trainer:
    """Holds a run's state; ``run()`` trains until ``cfg.steps`` or a stop signal.

    With ``resume`` the state comes from the run's latest checkpoint; a run that has none yet
    (stopped before its first) starts again from step 0, and ``started_over`` is then True.
    ``on_eval``, when given, is called with each evaluation's eval.csv row (qsm-sweep reports it
    to Ray Tune). Off the main thread (a Ray Tune trial) ``run()`` installs no signal handlers.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False,
                 on_eval: Callable[[dict[str, Any]], None] | None = None):
        cfg.validate()
        self.cfg, self.run_dir, self.on_eval = cfg, run_dir, on_eval
        torch.set_num_threads(resolve_threads(cfg.threads))
        self.device = resolve_device(cfg.device)
        seeds = np.random.SeedSequence(cfg.seed).generate_state(3 + cfg.eval_episodes)
        torch.manual_seed(cfg.seed)  # network initialisation
        self.env = make_env(cfg.task, seed=int(seeds[0]), action_repeat=cfg.action_repeat)
        self.eval_envs = [make_env(cfg.task, seed=int(s), action_repeat=cfg.action_repeat) for s in seeds[3:]]
        self.info = env_info(self.env)
        self.rng = np.random.default_rng(int(seeds[1]))  # random actions, replay indices
        self.eval_generator = torch.Generator(device=self.device)
        self.eval_generator.manual_seed(int(seeds[2]))
        self.learner = QSMLearner(learner_config(cfg), self.info.obs_dim, self.info.act_dim, self.device)
        self.replay = ReplayBuffer(self.info.obs_dim, self.info.act_dim, cfg.buffer_size, self.device)
        self.n_step = NStepReturns(cfg.n_step, cfg.gamma)
        self.step = self.episode_len = 0
        self.episode_return = self.elapsed_before = 0.0
        self.evals: list[float] = []
        self.last_saved_step = -1
        self.started_over = resume and not has_checkpoint(run_dir)
        if resume:
            remove_temporaries(run_dir / "checkpoints")  # partial writes of a killed process
            remove_temporary_files(run_dir)  # config.json, learning_curve.png
        if resume and not self.started_over:
            self._restore()
        else:
            self.obs = self.env.reset()[0]
        self.log = RunLog(run_dir, f"QSM {cfg.task} ({cfg.preset}, seed {cfg.seed})", self.step if resume else None)
        self._stop_signal: int | None = None
        self._t0 = time.perf_counter()  # run() restarts the clock

    # --- checkpoints -------------------------------------------------------------------------
    def _train_state(self) -> dict:
        L = self.learner
        return {
            CRITIC_STATE: L.critic.state_dict(), "critic_target": L.critic_target.state_dict(),
            "actor_opt": L.actor_opt.state_dict(), "critic_opt": L.critic_opt.state_dict(),
            "actor_lr_schedule": L.actor_lr_schedule.state_dict(), "num_updates": L.num_updates,
            "generator": L.generator.get_state(), "eval_generator": self.eval_generator.get_state(),
            "numpy_rng": self.rng.bit_generator.state, REPLAY_STATE: self.replay.state_dict(),
            "n_step_pending": self.n_step.state_dict(),
            "grad_rms": L.grad_rms.state_dict(),
            "env": get_env_state(self.env), "eval_envs": [get_env_state(e) for e in self.eval_envs],
            "obs": torch.as_tensor(self.obs), "step": self.step, "episode_return": self.episode_return,
            "episode_len": self.episode_len, "elapsed_s": self.elapsed(), "evals": self.evals,
        }

    def save(self) -> Path:
        path = save_checkpoint(
            self.run_dir / "checkpoints", self.step, policy_spec(self.cfg, self.info, self.step),
            self.learner.denoiser, self._train_state(), self.cfg.keep_checkpoints,
        )
        self.last_saved_step = self.step
        return path

    def _restore(self) -> None:
        ckpt, s = load_train_state(self.run_dir)
        L = self.learner
        L.denoiser.load_state_dict(load_file(str(ckpt / "policy.safetensors"), device=str(self.device)))
        L.critic.load_state_dict(s[CRITIC_STATE])
        L.critic_target.load_state_dict(s["critic_target"])
        L.actor_opt.load_state_dict(s["actor_opt"])
        L.critic_opt.load_state_dict(s["critic_opt"])
        L.actor_lr_schedule.load_state_dict(s["actor_lr_schedule"])
        L.num_updates = s["num_updates"]
        L.generator.set_state(s["generator"])
        self.eval_generator.set_state(s["eval_generator"])
        self.rng.bit_generator.state = s["numpy_rng"]
        self.replay.load_state_dict(s[REPLAY_STATE])
        if "n_step_pending" in s:  # checkpoints before n-step returns held none
            self.n_step.load_state_dict(s["n_step_pending"])
        if "grad_rms" in s:  # checkpoints before the scale-free target held none
            L.grad_rms.load_state_dict(s["grad_rms"])
        set_env_state(self.env, s["env"])
        for env, state in zip(self.eval_envs, s["eval_envs"]):
            set_env_state(env, state)
        self.obs = s["obs"].numpy()
        self.step, self.episode_return, self.episode_len = s["step"], s["episode_return"], s["episode_len"]
        self.elapsed_before, self.evals = s["elapsed_s"], s["evals"]
        self.last_saved_step = self.step

    # --- the loop ----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._t0

    def _request_stop(self, signum, frame) -> None:
        self._stop_signal = signum

    def evaluate(self) -> float:
        at_bound = [0, 0]  # action components within 1% of a bound, all components

        def policy(obs: np.ndarray) -> np.ndarray:
            obs_t = torch.as_tensor(obs, device=self.device)
            draw = partial(self.learner.act, explore=False, generator=self.eval_generator)
            action = best_of(obs_t, draw, self.learner.critic, self.cfg.eval_action_samples).cpu().numpy()
            at_bound[0] += int((np.abs(action) >= SATURATED_AT).sum())
            at_bound[1] += action.size
            return action

        returns = run_episodes(policy, self.eval_envs)
        mean = float(np.mean(returns))
        self.evals.append(mean)
        row = dict(step=self.step, time_s=round(self.elapsed(), 2), return_mean=mean,
                   return_std=float(np.std(returns)), return_min=float(np.min(returns)),
                   return_max=float(np.max(returns)), episodes=len(returns),
                   saturated=round(at_bound[0] / max(at_bound[1], 1), 4))
        self.log.eval(**row)
        if self.on_eval is not None:
            self.on_eval(row)
        tqdm.write(f"step {self.step}: eval return {mean:.1f} +- {np.std(returns):.1f} "
                   f"({len(returns)} episodes, {self.elapsed():.0f} s)", file=sys.stderr)
        return mean

    def collect(self) -> float | None:
        """One policy step in the training env, stored in the replay buffer (as an n-step
        transition once n steps have followed it, see :class:`NStepReturns`) with mask 0 only
        on a true termination (a time-limit truncation keeps mask 1). At an episode's end it
        logs the episode, resets the env and returns the episode's return; else None."""
        if self.step < self.cfg.learning_starts:
            action = self.rng.uniform(-1.0, 1.0, self.info.act_dim).astype(np.float32)
        else:
            obs_t = torch.as_tensor(self.obs, device=self.device)[None]
            action = self.learner.act(obs_t, explore=True)[0].cpu().numpy()
        next_obs, reward, terminated, truncated, _ = self.env.step(action)
        for transition in self.n_step.push(self.obs, action, reward, next_obs, terminated, truncated):
            self.replay.add(*transition)
        self.obs = next_obs
        self.episode_return += float(reward)
        self.episode_len += 1
        self.step += 1
        if not (terminated or truncated):
            return None
        finished = self.episode_return
        self.log.episode(step=self.step, time_s=round(self.elapsed(), 2),
                         **{"return": finished, "length": self.episode_len})
        self.obs = self.env.reset()[0]
        self.episode_return, self.episode_len = 0.0, 0
        return finished

    def run(self) -> RunResult:
        cfg = self.cfg
        self._t0 = time.perf_counter()
        main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM) if main_thread}
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=None, file=sys.stderr, smoothing=0.05)
        window_t, window_step, window_updates = time.perf_counter(), self.step, self.learner.num_updates
        last_train_return = None
        metrics: dict[str, torch.Tensor] = {}
        try:
            while self.step < cfg.steps and self._stop_signal is None:
                finished = self.collect()
                if finished is not None:
                    last_train_return = finished
                if self.step >= cfg.learning_starts:
                    for _ in range(cfg.updates_per_step):
                        metrics = self.learner.update(self.replay.sample(cfg.batch_size, self.rng))
                bar.update(1)

                if self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    sps = (self.step - window_step) / (now - window_t)
                    ups = (self.learner.num_updates - window_updates) / (now - window_t)
                    window_t, window_step, window_updates = now, self.step, self.learner.num_updates
                    values = {k: float(v) for k, v in metrics.items()}
                    self.log.train(step=self.step, time_s=round(self.elapsed(), 2), steps_per_s=round(sps, 2),
                                   updates_per_s=round(ups, 2), actor_lr=self.learner.actor_lr(), **values)
                    bar.set_postfix_str(self._postfix(sps, ups, last_train_return))
                if self.step % cfg.eval_every == 0:
                    self.evaluate()
                    bar.set_postfix_str(self._postfix(None, None, last_train_return))
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        if self._stop_signal is None and self.step % cfg.eval_every != 0:
            self.evaluate()  # always end on an evaluation of the final policy
        if self.step != self.last_saved_step:
            self.save()
        self.log.plot()
        self.log.close()
        wall = self.elapsed()
        return RunResult(
            run_dir=self.run_dir, step=self.step, wall_s=wall,
            final_eval=self.evals[-1] if self.evals else None,
            best_eval=max(self.evals) if self.evals else None,
            updates_per_s=self.learner.num_updates / max(wall, 1e-9),
            interrupted=self._stop_signal,
        )

    def _postfix(self, sps, ups, train_return) -> str:
        parts = []
        if sps is not None:
            parts += [f"{sps:.0f} steps/s", f"{ups:.0f} upd/s"]
        if train_return is not None:
            parts.append(f"train R {train_return:.0f}")
        if self.evals:
            parts.append(f"eval R {self.evals[-1]:.0f}")
        return ", ".join(parts)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create a new run directory and write config.json; refuse one that already holds a run."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    if (run_dir / "checkpoints" / "latest.json").exists() or (run_dir / "config.json").exists():
        raise RunDirError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    return run_dir
