"""dm_control suite tasks as gymnasium environments, and policy episodes in them."""

from qsm_robot.envs.dmc import (
    UnknownTaskError,
    env_info,
    get_env_state,
    list_tasks,
    make_env,
    set_env_state,
)
from qsm_robot.envs.rollout import run_episodes

__all__ = [
    "UnknownTaskError",
    "env_info",
    "get_env_state",
    "list_tasks",
    "make_env",
    "run_episodes",
    "set_env_state",
]
