"""What of a checkpoint folder readers outside training rely on, besides the policy part (no torch).

``qsm_robot.train.checkpoint`` writes the training state under these names (the training loop
stores its replay buffer under :data:`REPLAY_STATE`, the critics under :data:`CRITIC_STATE`); export
reads the buffer's observations with :func:`replay_observations` (the states its student is
distilled on) and Q-selected sampling the critics with :func:`critic_state`. This module lives outside
``train/`` so that export need not import the training package. The names are those of every
checkpoint written so far: changing one would orphan the replay buffers of existing runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRAIN_STATE_TENSORS = "train_state.safetensors"
"""The training state's tensors (critics, optimiser moments, replay buffer, RNG tensors)."""
TRAIN_STATE_META = "train_state.json"
"""The rest of the training state (counters, RNG and env states), with the tensors' keys."""
STATE_PREFIX = "state"
"""Root of the flattened training state: a tensor at state[a][b] is stored as ``state.a.b``."""
REPLAY_STATE = "replay"
"""The replay buffer's entry in the training state (its ``state_dict``: obs, action, ...)."""
REPLAY_OBS_KEY = f"{STATE_PREFIX}.{REPLAY_STATE}.obs"
"""The replay buffer's observations [N, obs_dim] in :data:`TRAIN_STATE_TENSORS`."""
CRITIC_STATE = "critic"
"""The twin critics' entry in the training state (their ``state_dict``)."""


def replay_observations(checkpoint: str | Path) -> np.ndarray | None:
    """The replay buffer's observations (float32 [N, obs_dim]) in the checkpoint folder
    ``checkpoint``, or None when it holds no training state or no replay buffer."""
    path = Path(checkpoint) / TRAIN_STATE_TENSORS
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        if REPLAY_OBS_KEY not in f.keys():
            return None
        return f.get_tensor(REPLAY_OBS_KEY).astype(np.float32)


def critic_state(checkpoint: str | Path) -> dict[str, np.ndarray] | None:
    """The critics' ``state_dict`` (parameter name -> array) in the checkpoint folder ``checkpoint``,
    or None when it holds no training state or no critics."""
    path = Path(checkpoint) / TRAIN_STATE_TENSORS
    if not path.is_file():
        return None
    from safetensors import safe_open

    prefix = f"{STATE_PREFIX}.{CRITIC_STATE}."
    with safe_open(str(path), framework="np") as f:
        state = {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}
    return state or None
