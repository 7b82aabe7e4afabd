import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")


@pytest.fixture
def cli_env():
    """Environment for running qsm-train as a subprocess: unbuffered, 1 thread per process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


QSM_TRAIN = [sys.executable, "-m", "qsm_robot.cli.train"]
REPO = Path(__file__).resolve().parents[1]
