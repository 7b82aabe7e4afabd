"""dm_control suite tasks as gymnasium environments."""

from qsm_robot.envs.dmc import (
    EnvInfo,
    UnknownTaskError,
    env_info,
    get_env_state,
    list_tasks,
    make_env,
    set_env_state,
)

__all__ = [
    "EnvInfo",
    "UnknownTaskError",
    "env_info",
    "get_env_state",
    "list_tasks",
    "make_env",
    "set_env_state",
]
