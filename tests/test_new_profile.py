"""``qsm-serve profile``: a starting deployment profile for any task, from the model's I/O."""

import json
import math

import pytest

from qsm_robot.cli.serve import main as serve_main
from qsm_robot.envs import env_info, list_tasks, make_env
from qsm_robot.policy_io import PolicyIO
from qsm_robot.serve.new_profile import starting_profile
from qsm_robot.serve.profile import Profile


def io_for(rate_hz: float, low=(-1.0, -2.0), high=(1.0, 2.0)) -> PolicyIO:
    return PolicyIO(task="custom-robot", obs=(("joints", 4), ("imu", 3)), action_names=("hip", "knee"),
                    action_low=tuple(low), action_high=tuple(high), control_period_s=1 / rate_hz, action_repeat=1,
                    episode_steps=500).validate()


def test_every_dm_control_task_gets_a_profile_that_validates():
    """Every task qsm-train accepts: its I/O description matches the flat observation, and the
    starting profile written from it loads (rates from 25 to 100 Hz, 1 to 56 actuators)."""
    for task in list_tasks():
        env = make_env(task)
        io = env_info(env)
        obs = env.reset()[0]
        assert obs.shape == (io.obs_dim,) and env.action_space.shape == (io.act_dim,), task
        assert io.episode_steps >= 1 and math.isfinite(io.control_period_s), task
        data, _ = starting_profile(io, "p")
        profile = Profile.from_dict(json.loads(json.dumps(data)))
        assert profile.policy == io and profile.rate_hz == pytest.approx(io.rate_hz), task


@pytest.mark.parametrize("rate_hz,stale,watchdog,misses,stale_run,budget_ms", [
    (1, 2, 4, 3, 3, 2.0),        # slow: at least 2-3 periods, budget 2 ms
    (40, 2, 4, 4, 10, 2.0),      # walker
    (100, 3, 5, 10, 25, 2.0),    # cartpole: today's hand-written values
    (1000, 30, 32, 100, 250, 0.5),
])
def test_timing_limits_are_set_in_time_not_periods(rate_hz, stale, watchdog, misses, stale_run, budget_ms):
    data, _ = starting_profile(io_for(rate_hz), "p")
    assert (data["stale_periods"], data["robot"]["watchdog_periods"], data["max_consecutive_misses"],
            data["max_consecutive_stale"], data["latency_budget_ms"]) == (stale, watchdog, misses, stale_run, budget_ms)
    assert Profile.from_dict(data).rate_hz == pytest.approx(rate_hz)


def test_safe_command_is_zero_inside_the_bounds_else_the_midpoint():
    data, notes = starting_profile(io_for(50, low=(-1.0, 0.5), high=(1.0, 1.5)), "p")
    assert data["safe_command"] == [0.0, 1.0]
    assert "0 (dm_control's zero action, inside the bounds) for hip" in notes[1]
    assert "the midpoint of the bounds (0 lies outside them) for knee" in notes[1]


def test_the_command_writes_a_profile_the_model_meets(tmp_path, tiny_model, capsys):
    out = tmp_path / "p.json"
    assert serve_main(["profile", "--model", str(tiny_model), "--name", "mine", "--out", str(out),
                       "--ipc", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    profile = Profile.load(out)
    assert profile.name == "mine" and profile.endpoints.state == f"ipc://{tmp_path.resolve()}/state.sock"
    from qsm_robot.export.runtime import make_session, read_contract
    from qsm_robot.serve.profile import check_contract

    check_contract(profile, read_contract(make_session(tiny_model)))  # raises on any mismatch
    text = out.read_text()
    assert '"action_low": [-1.0]' in text  # lists on one line: a file a person edits
    # An existing file is not replaced without --overwrite.
    assert serve_main(["profile", "--model", str(tiny_model), "--name", "mine", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert serve_main(["profile", "--model", str(tmp_path / "none.onnx"), "--name", "x",
                       "--out", str(tmp_path / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
