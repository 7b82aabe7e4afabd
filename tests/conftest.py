import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")

QSM_TRAIN = [sys.executable, "-m", "qsm_robot.cli.train"]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "campaigns"))  # the campaign scripts' fast parts run as tests


@pytest.fixture
def cli_env():
    """Environment for running qsm-train as a subprocess: unbuffered, 1 thread per process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def make_contract(**overrides):
    """The contract of a cartpole-swingup K=1 student (obs 5, act 1, 100 Hz, T=5)."""
    from qsm_robot.export.contract import ModelContract

    c = ModelContract(task="cartpole-swingup", obs_dim=5, obs_layout=[["position", 0, 3], ["velocity", 3, 2]], act_dim=1,
                      action_low=[-1.0], action_high=[1.0], control_period_s=0.01, action_repeat=1, sampler="student",
                      sampler_steps=1, teacher_steps=5, schedule="vp", noise_shape=["batch", 5, 1],
                      teacher_sha256="0" * 64, teacher_step=0)
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained 16-wide K=1 student as ONNX, with a cartpole-swingup contract: for serving tests."""
    import onnx
    import torch

    from qsm_robot.export import exporter
    from qsm_robot.export.student import ActuatorPolicy, StudentPolicy

    torch.manual_seed(0)
    module = ActuatorPolicy(StudentPolicy(5, 1, 5, steps=1, hidden_dim=16), [-1.0], [1.0]).eval()
    path = tmp_path_factory.mktemp("serve") / "tiny.onnx"
    onnx.save(exporter.to_onnx(module, 5, (5, 1), make_contract()), str(path))
    return path
