import json

import pytest
import torch
from conftest import CARTPOLE_IO

from qsm_robot.qsm.networks import Denoiser
from qsm_robot.qsm.policy import CheckpointError, PolicySpec, load_policy
from qsm_robot.train import checkpoint as ckpt_mod
from qsm_robot.train.checkpoint import flatten_state, load_train_state, save_checkpoint, unflatten_state


def spec(step=0) -> PolicySpec:
    return PolicySpec(
        io=CARTPOLE_IO, hidden_dim=16, num_layers=2, time_dim=8, fourier_dim=4, schedule="vp", diffusion_steps=5,
        temperature=1.0, clip_sample=True, step=step,
    )


def denoiser():
    return Denoiser(5, 1, hidden_dim=16, time_dim=8, fourier_dim=4)


def test_flatten_round_trip_keeps_types():
    state = {"opt": {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(4)}}, "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]},
             "counter": 7, "rng": {"state": {"state": 2**100}}}
    tensors = {}
    meta = json.loads(json.dumps(flatten_state(state, "s", tensors)))
    back = unflatten_state(meta, tensors)
    assert back["counter"] == 7 and back["rng"]["state"]["state"] == 2**100
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert list(back["opt"]["state"]) == [0] and torch.equal(back["opt"]["state"][0]["m"], state["opt"]["state"][0]["m"])


def test_policy_round_trip_gives_the_same_actions(tmp_path):
    d = denoiser()
    save_checkpoint(tmp_path / "checkpoints", 100, spec(100), d, {"x": torch.ones(2)}, keep=2)
    policy = load_policy(tmp_path)  # a run directory resolves to its latest checkpoint
    assert policy.spec.step == 100 and policy.spec.io == CARTPOLE_IO and policy.spec.io.obs_layout[1] == ("velocity", 3, 2)
    obs, noise = torch.randn(9, 5), torch.randn(9, 5, 1)
    from qsm_robot.qsm.sampler import ddpm_sample
    from qsm_robot.qsm.schedules import DiffusionSchedule

    with torch.no_grad():
        assert torch.equal(policy.sample(obs, noise), ddpm_sample(d, DiffusionSchedule("vp", 5), obs, noise))
    _, state = load_train_state(tmp_path)
    assert torch.equal(state["x"], torch.ones(2))


def test_latest_moves_and_old_checkpoints_are_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_checkpoint(root, step, spec(step), denoiser(), {}, keep=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_000000020", "step_000000030"]
    assert json.loads((root / "latest.json").read_text()) == {"checkpoint": "step_000000030", "step": 30}


def test_a_crash_while_writing_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 10, spec(10), denoiser(), {"a": torch.zeros(1)}, keep=2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", crash)  # fails after the policy files are written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, 20, spec(20), denoiser(), {"a": torch.zeros(1)}, keep=2)
    assert load_policy(tmp_path).spec.step == 10
    assert not (root / "step_000000020").exists()


@pytest.mark.parametrize("damage,message", [
    (lambda c: (c / "policy.json").write_text("{not json"), "cannot read the policy"),
    (lambda c: (c / "policy.safetensors").write_bytes(b"\x00" * 10), "cannot read the policy"),
    (lambda c: (c / "policy.json").write_text(json.dumps({**json.loads((c / "policy.json").read_text()), "format_version": 99})), "format version 99"),
    (lambda c: (c / "policy.json").write_text(json.dumps({**json.loads((c / "policy.json").read_text()), "hidden_dim": 32})), "do not match"),
])
def test_damaged_checkpoints_fail_with_a_clear_error(tmp_path, damage, message):
    path = save_checkpoint(tmp_path / "checkpoints", 10, spec(10), denoiser(), {}, keep=2)
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_policy(tmp_path)


def test_missing_checkpoint_fails_with_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_policy(tmp_path)


def test_policy_json_holds_the_io_description(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoints", 10, spec(10), denoiser(), {}, keep=2)
    data = json.loads((path / "policy.json").read_text())
    assert data["format_version"] == 2 and data["io"] == CARTPOLE_IO.to_dict()
    assert not {"task", "obs_dim", "act_dim", "obs_layout", "action_low", "action_high"} & set(data)
    assert PolicySpec.from_dict(data) == spec(10)


def v1_policy_json(**changes) -> dict:
    """policy.json as format version 1 wrote it (asdict of the old PolicySpec, its field order)."""
    data = {
        "task": "cartpole-swingup", "obs_dim": 5, "act_dim": 1, "obs_layout": [["position", 0, 3], ["velocity", 3, 2]],
        "action_low": [-1.0], "action_high": [1.0], "control_period_s": 0.01, "action_repeat": 1, "hidden_dim": 16,
        "num_layers": 2, "time_dim": 8, "fourier_dim": 4, "schedule": "vp", "diffusion_steps": 5,
        "temperature": 1.0, "clip_sample": True, "step": 10, "format": "qsm-robot/policy", "format_version": 1,
    }
    return {**data, **changes}


def write_v1(tmp_path, d=None, **changes):
    """A checkpoint whose policy.json is version 1 (with ``changes``); returns its folder."""
    path = save_checkpoint(tmp_path / "checkpoints", 10, spec(10), d or denoiser(), {}, keep=2)
    (path / "policy.json").write_text(json.dumps(v1_policy_json(**changes), indent=2))
    return path


@pytest.mark.parametrize("repeat", [1, 2])
def test_a_version_1_policy_loads_with_its_io_rebuilt_from_the_task(tmp_path, repeat):
    from qsm_robot.envs import env_info, make_env

    d = denoiser()
    path = write_v1(tmp_path, d, action_repeat=repeat, control_period_s=0.01 * repeat)
    policy = load_policy(tmp_path)
    assert policy.spec.io == env_info(make_env("cartpole-swingup", action_repeat=repeat))
    assert policy.spec.io.action_names == ("slide",) and policy.spec.io.episode_steps == 1000 // repeat
    assert policy.spec.step == 10 and policy.spec.format_version == 2
    assert json.loads((path / "policy.json").read_text())["format_version"] == 1  # the file is left as it was
    obs, noise = torch.randn(3, 5), torch.randn(3, 5, 1)
    from qsm_robot.qsm.sampler import ddpm_sample
    from qsm_robot.qsm.schedules import DiffusionSchedule

    with torch.no_grad():
        assert torch.equal(policy.sample(obs, noise), ddpm_sample(d, DiffusionSchedule("vp", 5), obs, noise))


@pytest.mark.parametrize("changes,expected", [
    ({"obs_dim": 6}, "obs_dim: checkpoint 6, environment 5"),
    ({"obs_layout": [["velocity", 0, 2], ["position", 2, 3]]},
     "obs_layout: checkpoint [['velocity', 0, 2], ['position', 2, 3]], environment [['position', 0, 3], ['velocity', 3, 2]]"),
    ({"act_dim": 2}, "act_dim: checkpoint 2, environment 1"),
    ({"action_low": [-2.0]}, "action_low: checkpoint [-2.0], environment [-1.0]"),
    ({"action_high": [1.0, 1.0]}, "action_high: checkpoint [1.0, 1.0], environment [1.0]"),
    ({"control_period_s": 0.02}, "control_period_s: checkpoint 0.02, environment 0.01"),
])
def test_a_version_1_policy_that_disagrees_with_its_task_is_refused(tmp_path, changes, expected):
    write_v1(tmp_path, **changes)
    with pytest.raises(CheckpointError) as info:
        load_policy(tmp_path)
    text = str(info.value)
    assert "format version 1" in text and "disagree with 'cartpole-swingup' (action_repeat 1)" in text
    assert expected in text and "load it with the qsm-robot and dm_control versions that wrote it, or train again" in text


def test_a_version_1_policy_names_every_disagreement_and_an_unknown_task(tmp_path):
    write_v1(tmp_path, obs_dim=4, act_dim=3)
    with pytest.raises(CheckpointError, match="obs_dim: checkpoint 4, environment 5; act_dim: checkpoint 3"):
        load_policy(tmp_path)
    write_v1(tmp_path, task="cartpole-swing")
    with pytest.raises(CheckpointError, match="format version 1 and its task cannot be rebuilt: unknown task 'cartpole-swing'"):
        load_policy(tmp_path)
    write_v1(tmp_path, obs_layout=None)
    with pytest.raises(CheckpointError, match=r"policy.json \(format version 1\) is malformed"):
        load_policy(tmp_path)
    path = write_v1(tmp_path)
    (path / "policy.json").write_text(json.dumps({k: v for k, v in v1_policy_json().items() if k != "obs_layout"}))
    with pytest.raises(CheckpointError, match=r"policy.json \(format version 1\) lacks \['obs_layout'\]"):
        load_policy(tmp_path)
