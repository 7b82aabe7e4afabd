"""dm_control suite tasks as gymnasium environments.

``make_env("cartpole-swingup", seed=0)`` gives a gymnasium env with

* float32 flat observations: the dm_control observation dict flattened in the order of
  gymnasium's observation space (which sorts the keys: walker's ``height`` comes before
  ``orientations``, unlike dm_control's spec); ``PolicyIO.obs`` lists each key and its size in
  that order;
* actions in [-1, 1], rescaled linearly to the actuator bounds;
* ``terminated`` only at a true terminal state (dm_control discount 0), ``truncated`` at the
  time limit;
* an optional ``action_repeat``: the action is applied that many physics control steps and the
  rewards are summed.

``env_info(env)`` is the env's :class:`~qsm_robot.policy_io.PolicyIO`: task, observation layout,
actuator names and bounds, control period, action repeat, episode length. It is built here, once,
and every later stage (checkpoint, ONNX contract, deployment profile) carries it.

The adapter is shimmy's ``DmControlCompatibilityV0``; the few wrappers here are gymnasium's own.
"""

from __future__ import annotations

import math
import os
from typing import Any

# No rendering is needed for training; without this, dm_control probes GLFW and warns on a
# headless machine. A caller that wants frames sets MUJOCO_GL=egl or osmesa itself.
os.environ.setdefault("MUJOCO_GL", "disable")

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from dm_control import suite  # noqa: E402
from gymnasium.wrappers import FlattenObservation, RescaleAction  # noqa: E402
from shimmy.dm_control_compatibility import DmControlCompatibilityV0  # noqa: E402

from qsm_robot.policy_io import PolicyIO  # noqa: E402


DEFAULT_EPISODE_CONTROL_STEPS = 1000
"""Time limit, in control steps, of a task that has none of its own (the lqr domain)."""


def _without_rendering(physics) -> None:
    """Let a headless physics report "no rendering context" instead of trying to make one.

    Some tasks (quadruped-escape, quadruped-fetch) re-upload their random terrain to the renderer
    at every reset when ``physics.contexts`` is set, and reading that property creates the
    contexts, which raises with MUJOCO_GL=disable. Headless, there is nothing to upload to.
    """
    cls = physics.__class__
    physics.__class__ = type(f"Headless{cls.__name__}", (cls,), {"contexts": property(lambda self: self._contexts)})


class UnknownTaskError(ValueError):
    """A task name that is not a dm_control suite task."""


def list_tasks() -> list[str]:
    """All dm_control suite tasks, as ``domain-task`` names."""
    return sorted(f"{domain}-{task}" for domain, task in suite.ALL_TASKS)


def _split_task(name: str) -> tuple[str, str]:
    valid = list_tasks()
    if name not in valid:
        raise UnknownTaskError(
            f"unknown task {name!r}; valid tasks (domain-task): {', '.join(valid)}"
        )
    domain, task = name.split("-", 1)
    return domain, task


class ActionRepeat(gym.Wrapper):
    """Repeat each action ``repeat`` times, summing rewards; stop early at an episode end."""

    def __init__(self, env: gym.Env, repeat: int):
        super().__init__(env)
        self.repeat = repeat

    def step(self, action):
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


class Float32Observation(gym.ObservationWrapper):
    """Cast the flat observation to float32."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Box(
            low=space.low.astype(np.float32),
            high=space.high.astype(np.float32),
            shape=space.shape,
            dtype=np.float32,
        )

    def observation(self, observation):
        return np.asarray(observation, dtype=np.float32)


def actuator_names(model, count: int) -> tuple[str, ...]:
    """dm_control's name of each actuator of ``model`` (a physics model), ``a<i>`` where it has none."""
    return tuple(model.id2name(i, "actuator") or f"a{i}" for i in range(count))


def make_env(task: str, seed: int | None = None, action_repeat: int = 1, rescale_actions: bool = True) -> gym.Env:
    """Build ``task`` (``domain-task``) as a gymnasium env; see the module docstring.

    ``seed`` seeds the task's own random state (initial states, noise): two envs built with
    the same seed and driven with the same actions give the same episodes. With
    ``rescale_actions=False`` the env takes actions in actuator units, as a robot would.
    """
    if action_repeat < 1:
        raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
    domain, name = _split_task(task)
    dm_env = suite.load(domain, name, task_kwargs={"random": seed})
    if math.isinf(dm_env._step_limit):
        # The lqr tasks have no time limit (they end only at the goal): give them the suite's usual
        # 1000 control steps, so that every episode, evaluation and served run ends.
        limit_s = DEFAULT_EPISODE_CONTROL_STEPS * dm_env.control_timestep()
        dm_env = suite.load(domain, name, task_kwargs={"random": seed, "time_limit": limit_s})
    if os.environ.get("MUJOCO_GL") == "disable":
        _without_rendering(dm_env.physics)
    env: gym.Env = DmControlCompatibilityV0(dm_env)
    low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    # FlattenObservation concatenates the parts in the Dict space's order: that is the layout.
    obs = tuple((key, int(np.prod(space.shape))) for key, space in env.observation_space.spaces.items())
    env = FlattenObservation(env)
    env = Float32Observation(env)
    if rescale_actions:
        env = RescaleAction(env, min_action=-1.0, max_action=1.0)
    if action_repeat > 1:
        env = ActionRepeat(env, action_repeat)
    io = PolicyIO(
        task=task,
        obs=obs,
        action_names=actuator_names(dm_env.physics.model, int(low.shape[0])),
        action_low=tuple(low.tolist()),
        action_high=tuple(high.tolist()),
        control_period_s=float(dm_env.control_timestep()) * action_repeat,
        action_repeat=action_repeat,
        episode_steps=math.ceil(int(dm_env._step_limit) / action_repeat),
    ).validate()
    env.metadata = {**env.metadata, "qsm_robot": io}
    return env


def env_info(env: gym.Env) -> PolicyIO:
    """The :class:`~qsm_robot.policy_io.PolicyIO` of an env made by :func:`make_env`."""
    return env.metadata["qsm_robot"]


def _dm_env(env: gym.Env):
    return env.unwrapped._env


EPISODE_MODEL_FIELDS = ("body_pos", "body_quat", "geom_pos", "geom_size", "geom_rgba", "site_pos", "site_size",
                        "site_rgba", "light_pos", "dof_damping", "hfield_data")
"""MuJoCo *model* arrays that dm_control tasks change when an episode starts, outside the data
state: reacher's target (geom_pos, geom_size), finger's (site_pos, site_size), manipulator's and
stacker's (body_pos), swimmer's light, quadruped's terrain (hfield_data). Without them a resumed
reacher-easy run continued its episode towards the model file's default target."""


def get_env_state(env: gym.Env) -> dict[str, Any]:
    """Everything needed to continue ``env`` bit-for-bit later, mid-episode included.

    The physics is saved with MuJoCo's full integration state (which includes the solver's
    warm start), the model arrays of :data:`EPISODE_MODEL_FIELDS`, the task's random state and the
    time-limit counter with it.
    """
    dm_env = _dm_env(env)
    physics = dm_env.physics
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(physics.model.ptr, spec), dtype=np.float64)
    mujoco.mj_getState(physics.model.ptr, physics.data.ptr, state, spec)
    kind, keys, pos, has_gauss, gauss = dm_env.task.random.get_state()
    return {
        "physics": state.tolist(),
        "model": {name: getattr(physics.model, name).tolist() for name in EPISODE_MODEL_FIELDS},
        "step_count": int(dm_env._step_count),
        "reset_next_step": bool(dm_env._reset_next_step),
        "random": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }


def set_env_state(env: gym.Env, state: dict[str, Any]) -> None:
    """Restore a state taken by :func:`get_env_state` into an env of the same task."""
    dm_env = _dm_env(env)
    physics = dm_env.physics
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    values = np.asarray(state["physics"], dtype=np.float64)
    for name, value in state.get("model", {}).items():  # checkpoints before EPISODE_MODEL_FIELDS held none
        field = getattr(physics.model, name)
        field[...] = np.asarray(value, dtype=field.dtype).reshape(field.shape)
    mujoco.mj_setState(physics.model.ptr, physics.data.ptr, values, spec)
    mujoco.mj_forward(physics.model.ptr, physics.data.ptr)
    dm_env._step_count = state["step_count"]
    dm_env._reset_next_step = state["reset_next_step"]
    kind, keys, pos, has_gauss, gauss = state["random"]
    dm_env.task.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
