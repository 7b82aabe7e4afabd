import os
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from qsm_robot.policy_io import PolicyIO

os.environ.setdefault("MUJOCO_GL", "disable")

QSM_TRAIN = [sys.executable, "-m", "qsm_robot.cli.train"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli_env():
    """Environment for running qsm-train as a subprocess: unbuffered, 1 thread per process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


CARTPOLE_IO = PolicyIO(task="cartpole-swingup", obs=(("position", 3), ("velocity", 2)), action_names=("slide",),
                       action_low=(-1.0,), action_high=(1.0,), control_period_s=0.01, action_repeat=1,
                       episode_steps=1000).validate()
"""cartpole-swingup as make_env builds it (tests/test_envs.py checks): obs position 3 + velocity 2,
actuator 'slide' in [-1, 1], 100 Hz, 1000 steps. The one I/O description the tests share."""


SHAPES = {
    "cartpole": CARTPOLE_IO,
    "reacher": PolicyIO(task="reacher-easy", obs=(("position", 2), ("to_target", 2), ("velocity", 2)),
                        action_names=("shoulder", "wrist"), action_low=(-1.0, -1.0), action_high=(1.0, 1.0),
                        control_period_s=0.02, action_repeat=1, episode_steps=1000).validate(),
    "walker": PolicyIO(task="walker-stand", obs=(("height", 1), ("orientations", 14), ("velocity", 9)),
                       action_names=("right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle"),
                       action_low=(-1.0,) * 6, action_high=(1.0,) * 6, control_period_s=0.025, action_repeat=1,
                       episode_steps=1000).validate(),
}
"""Policy shapes the serving tests run with: obs 5 / act 1, obs 6 / act 2, obs 24 / act 6."""


def cartpole_io(**overrides) -> PolicyIO:
    """CARTPOLE_IO with some fields changed (validated)."""
    return replace(CARTPOLE_IO, **overrides).validate()


def make_contract(io: PolicyIO = CARTPOLE_IO, **overrides):
    """The contract of a K=1 student (T=5) for ``io`` (default cartpole-swingup). Overrides of
    PolicyIO fields change its ``io``; the others change the contract's own fields."""
    from qsm_robot.export.contract import ModelContract

    io_names = {f.name for f in fields(PolicyIO)}
    io = replace(io, **{k: v for k, v in overrides.items() if k in io_names}).validate()
    c = ModelContract(io=io, sampler="student", sampler_steps=1, teacher_steps=5, schedule="vp",
                      noise_shape=["batch", 5, io.act_dim], teacher_sha256="0" * 64, teacher_step=0)
    for k, v in overrides.items():
        if k not in io_names:
            setattr(c, k, v)
    return c


def profile_data(name: str = "test", **overrides) -> dict:
    """A version-2 profile as JSON data: CARTPOLE_IO as its policy, safe command 0, then overrides."""
    return {"name": name, "profile_version": 2, "policy": CARTPOLE_IO.to_dict(), "safe_command": [0.0], **overrides}


def write_tiny_model(io: PolicyIO, path: Path) -> Path:
    """An untrained 16-wide K=1 student for ``io`` as ONNX, with its contract: for serving tests."""
    import onnx
    import torch

    from qsm_robot.export import exporter
    from qsm_robot.export.student import ActuatorPolicy, StudentPolicy

    T = 5
    torch.manual_seed(0)
    module = ActuatorPolicy(StudentPolicy(io.obs_dim, io.act_dim, T, steps=1, hidden_dim=16), io.action_low,
                            io.action_high).eval()
    onnx.save(exporter.to_onnx(module, io.obs_dim, (T, io.act_dim), make_contract(io)), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained 16-wide K=1 student as ONNX, with a cartpole-swingup contract: for serving tests."""
    return write_tiny_model(CARTPOLE_IO, tmp_path_factory.mktemp("serve") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per entry of SHAPES."""
    folder = tmp_path_factory.mktemp("shapes")
    return {name: write_tiny_model(io, folder / f"{name}.onnx") for name, io in SHAPES.items()}
