import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from qsm_robot.envs import UnknownTaskError, env_info, get_env_state, list_tasks, make_env, set_env_state


@pytest.mark.parametrize("task", ["cartpole-swingup", "walker-walk"])
def test_gymnasium_check_env(task):
    env = make_env(task, seed=0)
    check_env(env, skip_render_check=True)
    info = env_info(env)
    obs, _ = env.reset()
    assert obs.dtype == np.float32 and obs.shape == (info.obs_dim,)
    assert sum(size for _, _, size in info.obs_layout) == info.obs_dim
    assert env.action_space.low.tolist() == [-1.0] * info.act_dim
    assert env.action_space.high.tolist() == [1.0] * info.act_dim


def test_metadata_keeps_true_actuator_bounds():
    info = env_info(make_env("cheetah-run", seed=0))
    assert info.act_dim == 6 and len(info.action_low) == 6
    assert all(lo < hi for lo, hi in zip(info.action_low, info.action_high))
    assert info.control_period_s == pytest.approx(0.01)


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(UnknownTaskError, match="unknown task 'cartpole-swing'.*cartpole-swingup"):
        make_env("cartpole-swing")
    assert "walker-walk" in list_tasks()


def test_time_limit_is_truncation_not_termination():
    env = make_env("cartpole-swingup", seed=0)
    env.reset()
    for i in range(1000):
        _, _, terminated, truncated, _ = env.step(np.zeros(1, np.float32))
        assert not terminated
        assert truncated == (i == 999)


def test_action_repeat_shortens_episodes_and_sums_rewards():
    env = make_env("cartpole-swingup", seed=0, action_repeat=4)
    info = env_info(env)
    assert info.episode_steps == 250 and info.control_period_s == pytest.approx(0.04) and info.action_repeat == 4
    env.reset()
    steps, total = 0, 0.0
    while True:
        _, r, term, trunc, _ = env.step(np.zeros(1, np.float32))
        steps, total = steps + 1, total + r
        if term or trunc:
            break
    assert steps == 250 and 0 < total <= 1000


@pytest.mark.parametrize("task", ["walker-walk", "reacher-easy", "finger-turn_easy"])
def test_same_seed_same_episode_and_state_restores_mid_episode(task):
    """reacher and finger place their targets in the MuJoCo model (not its data) at each reset:
    the restored env must continue towards the saved episode's target, not its own."""
    a, b = make_env(task, seed=3), make_env(task, seed=3)
    assert np.array_equal(a.reset()[0], b.reset()[0])
    actions = np.random.default_rng(0).uniform(-1, 1, (60, *a.action_space.shape)).astype(np.float32)
    for act in actions[:30]:
        a.step(act)
    state = get_env_state(a)
    expected = [a.step(act)[0] for act in actions[30:]]
    other = make_env(task, seed=99)
    other.reset()
    set_env_state(other, state)
    assert all(np.array_equal(x, other.step(act)[0]) for x, act in zip(expected, actions[30:]))


def test_the_io_description_is_what_the_tests_share_and_survives_json():
    from conftest import CARTPOLE_IO

    from qsm_robot.policy_io import PolicyIO

    info = env_info(make_env("cartpole-swingup", seed=0))
    assert info == CARTPOLE_IO
    assert PolicyIO.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert env_info(make_env("cartpole-swingup", action_repeat=3)).episode_steps == 334  # ceil(1000 / 3)


def test_obs_layout_follows_the_flat_vector_and_actuators_have_their_names():
    env = make_env("walker-walk", seed=0)
    info = env_info(env)
    # gymnasium's Dict space sorts the keys, so the flat order is not dm_control's spec order.
    assert info.obs == (("height", 1), ("orientations", 14), ("velocity", 9))
    assert info.action_names == ("right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle")
    obs, _ = env.reset()
    parts = env.unwrapped._env.task.get_observation(env.unwrapped._env.physics)
    for name, offset, size in info.obs_layout:
        assert np.allclose(obs[offset:offset + size], np.ravel(parts[name]), atol=1e-6), name


def test_an_actuator_without_a_name_is_called_by_its_index():
    from qsm_robot.envs.dmc import actuator_names

    class Model:
        def id2name(self, i, kind):
            assert kind == "actuator"
            return ["slide", "", "lift"][i]

    assert actuator_names(Model(), 3) == ("slide", "a1", "lift")
