"""dm_control suite tasks as gymnasium environments."""

from qsm_robot.envs.dmc import (
    UnknownTaskError,
    env_info,
    get_env_state,
    list_tasks,
    make_env,
    set_env_state,
)

__all__ = [
    "UnknownTaskError",
    "env_info",
    "get_env_state",
    "list_tasks",
    "make_env",
    "set_env_state",
]
