"""qsm-sweep's spec: parsing, trial names, sweep files, and bad input refused before Ray starts."""

import json

import pytest

from qsm_robot.cli.sweep import main
from qsm_robot.sweep import grid, runner
from qsm_robot.sweep.grid import Resources, SweepError, SweepSpec, expand, normalize_spec, parse_value

SMOKE = ["--presets", "smoke", "--steps", "300"]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the command gets as far as starting Ray."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(runner, "init_ray", refuse)


def test_values_take_their_field_type():
    assert parse_value("hidden-dim", "256") == 256
    assert parse_value("steps", "1e5") == 100_000
    assert parse_value("q_grad_scale", "120") == 120.0 and isinstance(parse_value("q_grad_scale", 50), float)
    assert parse_value("clip_sample", "false") is False
    assert parse_value("schedule", "cosine") == "cosine"


@pytest.mark.parametrize("name,value,message", [
    ("hidden_dim", "wide", "hidden_dim: expected an integer, got 'wide'"),
    ("hidden_dim", 2.5, "hidden_dim: expected an integer, got 2.5"),
    ("hidden_dim", True, "hidden_dim: expected an integer"),
    ("gamma", "high", "gamma: expected a number, got 'high'"),
    ("clip_sample", "maybe", "clip_sample: expected true or false"),
    ("schedule", 3, "schedule: expected a string, got 3"),
    ("hiden_dim", "64", "hiden_dim: unknown TrainConfig field (did you mean hidden_dim?)"),
    ("threads", "2", "threads: set by the sweep, not an override"),
    ("device", "cuda", "device: set by the sweep, not an override"),
])
def test_bad_values_name_the_field(name, value, message):
    with pytest.raises(SweepError, match=None) as info:
        parse_value(name, value)
    assert message in str(info.value)


def test_grid_expands_to_named_trials_with_validated_configs(tmp_path):
    spec = normalize_spec(SweepSpec(tasks=["cartpole-swingup", "walker-walk"], presets=["smoke"], seeds=[0, 1],
                                    set={"steps": "500"}, grid={"q_grad_scale": ["30", "50"]}))
    trials = expand(spec, tmp_path)
    assert len(trials) == 2 * 2 * 2
    names = [t.name for t in trials]
    assert names[0] == "cartpole-swingup__smoke__seed0__q_grad_scale=30.0"
    assert "walker-walk__smoke__seed1__q_grad_scale=50.0" in names
    t = trials[-1]
    assert t.run_dir == (tmp_path / "trials" / t.name).resolve()
    assert (t.config.task, t.config.seed, t.config.steps, t.config.q_grad_scale, t.config.hidden_dim) == \
        ("walker-walk", 1, 500, 50.0, 32)
    assert t.config.run_dir == str(t.run_dir)


def test_sweep_files_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("tasks: [cartpole-swingup]\npresets: smoke\nseeds: [3, 4]\nset: {steps: 400}\n"
                         "grid: {hidden_dim: [16, 32]}\nresources: {cpus_per_trial: 0.5, max_failures: 1}\n")
    fields, resources = grid.load_sweep_file(yaml_file)
    spec = normalize_spec(SweepSpec(**fields))
    assert spec.presets == ["smoke"] and spec.seeds == [3, 4] and spec.grid == {"hidden_dim": [16, 32]}
    assert grid.make_resources(resources) == Resources(cpus_per_trial=0.5, max_failures=1)
    json_file = tmp_path / "s.json"
    json_file.write_text(json.dumps({"tasks": ["cartpole-swingup"], "sets": {"steps": 3}}))
    with pytest.raises(SweepError, match="sets: unknown sweep-file key"):
        grid.load_sweep_file(json_file)


@pytest.mark.parametrize("args,message", [
    (["--tasks", "cartpole-swing"], "task: unknown task 'cartpole-swing'"),
    (["--tasks", "cartpole-swingup", "--presets", "huge"], "preset: unknown preset 'huge'"),
    (["--tasks", "cartpole-swingup", "--set", "hiden_dim=64"], "hiden_dim: unknown TrainConfig field"),
    (["--tasks", "cartpole-swingup", "--set", "hidden_dim=wide"], "hidden_dim: expected an integer, got 'wide'"),
    (["--tasks", "cartpole-swingup", "--grid", "hidden_dim=64,wide"], "hidden_dim: expected an integer, got 'wide'"),
    (["--tasks", "cartpole-swingup", "--set", "gamma=1.5"], "gamma: must be in [0, 1]"),
    (["--tasks", "cartpole-swingup", "--set", "seed=3"], "seed: set by the sweep"),
    (["--tasks", "cartpole-swingup", "--seeds", "0", "x"], "seeds: expected integers, got 'x'"),
    (["--tasks", "cartpole-swingup", "--cpus-per-trial", "0"], "cpus_per_trial: must be > 0"),
    (["--tasks", "cartpole-swingup", "--cpus-per-trial", "64", "--num-cpus", "2"], "cpus_per_trial: 64 per trial"),
    ([], "tasks: a new sweep needs tasks"),
])
def test_bad_input_fails_before_ray_starts(tmp_path, capsys, no_ray, args, message):
    sweep = tmp_path / "sweep"
    assert main(["run", str(sweep)] + SMOKE + args) == 2
    assert message in capsys.readouterr().err
    assert not (sweep / "trials").exists()


def test_a_folder_holding_another_sweep_or_a_run_is_refused(tmp_path, capsys, no_ray):
    sweep = tmp_path / "sweep"
    spec = normalize_spec(SweepSpec(tasks=["cartpole-swingup"], presets=["smoke"], seeds=[0, 1], set={"steps": 300}))
    grid.write_sweep_json(sweep, spec, Resources(), expand(spec, sweep))
    before = (sweep / "sweep.json").read_text()
    assert main(["run", str(sweep), "--tasks", "cartpole-swingup", "--presets", "smoke", "--seeds", "0", "1", "2",
                 "--steps", "500"]) == 2
    err = capsys.readouterr().err
    assert "holds another sweep" in err and "seeds: [0, 1] there, [0, 1, 2] here" in err
    assert "set.steps: 300 there, 500 here" in err and f"qsm-sweep run --resume {sweep}" in err
    assert (sweep / "sweep.json").read_text() == before
    assert main(["run", "--resume", str(sweep), "--seeds", "4"]) == 2
    assert "with --resume give only resources" in capsys.readouterr().err

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    assert main(["run", str(run_dir), "--tasks", "cartpole-swingup"] + SMOKE) == 2
    assert "is a run directory (it holds config.json)" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["run", str(other), "--tasks", "cartpole-swingup"] + SMOKE) == 2
    assert "holds files but no sweep.json" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "holds no sweep.json" in capsys.readouterr().err


def test_a_finished_sweep_is_skipped_without_starting_ray(tmp_path, capsys, no_ray):
    """Re-running a sweep whose trials all have their final checkpoint runs nothing."""
    sweep = tmp_path / "sweep"
    args = ["run", str(sweep), "--tasks", "cartpole-swingup", "--presets", "smoke", "--seeds", "0", "1", "--steps", "300"]
    spec = normalize_spec(SweepSpec(tasks=["cartpole-swingup"], presets=["smoke"], seeds=[0, 1], set={"steps": 300}))
    trials = expand(spec, sweep)
    grid.write_sweep_json(sweep, spec, Resources(), trials)
    for t in trials:  # as a finished trial leaves them
        (t.run_dir / "checkpoints").mkdir(parents=True)
        (t.run_dir / "config.json").write_text(json.dumps(t.config.to_dict()))
        (t.run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step_000000300", "step": 300}))
    assert main(args) == 0
    assert "all 2 trials of" in capsys.readouterr().err
    assert main(["run", "--resume", str(sweep)]) == 0
    assert "nothing to run" in capsys.readouterr().err
    assert not (sweep / "tune").exists()


def test_threads_and_device_follow_resources():
    assert runner.trial_threads(1) == 1 and runner.trial_threads(0.5) == 1 and runner.trial_threads(3.0) == 3
    assert runner.trial_device(0) == "cpu" and runner.trial_device(0.25) == "cuda"
