"""qsm-export: graph, parity, contract, bounds, gates and CLI errors, on tiny policies."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qsm_robot.cli.export import main as export_main
from qsm_robot.cli.train import main as train_main
from qsm_robot.envs import env_info, make_env
from qsm_robot.export import exporter
from qsm_robot.export.contract import ContractError, ModelContract
from qsm_robot.export.runtime import make_session, read_contract
from qsm_robot.export.mixture import MixtureStudent
from qsm_robot.export.student import ActuatorPolicy, StudentPolicy, TeacherLastStep, TeacherSampler
from qsm_robot.policy_io import PolicyIO
from qsm_robot.qsm.policy import DiffusionPolicy, PolicySpec, load_policy

FAST = ["--distill-iterations", "150", "--distill-batch", "128", "--student-hidden", "32", "--state-episodes", "1",
        "--eval-episodes", "2", "--latency-calls", "200", "--threads", "1", "--start-episodes", "3", "--start-steps", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run (smoke preset, 300 steps)."""
    run = tmp_path_factory.mktemp("export") / "run"
    assert train_main(["--preset", "smoke", "--steps", "300", "--learning-starts", "100", "--threads", "1",
                       "--run-dir", str(run)]) == 0
    return run


TINY_IO = PolicyIO(task="tiny", obs=(("x", 4),), action_names=("a0", "a1"), action_low=(-2.0, 0.0),
                   action_high=(3.0, 0.5), control_period_s=0.01, action_repeat=1, episode_steps=100).validate()
"""Two actuators with asymmetric bounds: the rescaling and clipping show."""


def tiny_spec() -> PolicySpec:
    return PolicySpec(io=TINY_IO, hidden_dim=16, num_layers=2, time_dim=8, fourier_dim=4, schedule="vp",
                      diffusion_steps=4, temperature=1.0, clip_sample=True, step=0)


def test_zero_noise_decode_is_the_chain_run_on_zero_noise_whatever_the_temperature():
    torch.manual_seed(0)
    policy = DiffusionPolicy(tiny_spec()).eval()
    obs = torch.randn(16, 4)
    decoded = policy.decode(obs)
    with torch.no_grad():
        assert torch.equal(decoded, policy.sample(obs, torch.zeros(16, 4, 2)))
        assert not torch.equal(decoded, policy.sample(obs, torch.randn(16, 4, 2)))  # not a draw
    assert torch.equal(policy.decode(obs), decoded)  # no hidden randomness
    policy.spec.temperature = 0.3
    assert torch.equal(policy.decode(obs), decoded)  # no noise for the temperature to scale


def contract_for(spec: PolicySpec) -> ModelContract:
    return ModelContract(io=spec.io, sampler="student", sampler_steps=1, teacher_steps=spec.diffusion_steps, schedule="vp",
                         noise_shape=["batch", spec.diffusion_steps, spec.io.act_dim], teacher_sha256="0" * 64,
                         teacher_step=0)


def exported_pair(kind: str):
    torch.manual_seed(0)
    spec = tiny_spec()
    sampler = {"student": lambda: StudentPolicy(4, 2, spec.diffusion_steps, steps=2, hidden_dim=16),
               "mixture": lambda: MixtureStudent(4, 2, spec.diffusion_steps, hidden_dim=16),
               "mixture from teacher": lambda: MixtureStudent.from_teacher(DiffusionPolicy(spec).denoiser, spec.diffusion_steps),
               "mixture, then the teacher's last step": lambda: TeacherLastStep(
                   MixtureStudent(4, 2, spec.diffusion_steps, hidden_dim=16), DiffusionPolicy(spec)),
               "teacher": lambda: TeacherSampler(DiffusionPolicy(spec))}[kind]()
    module = ActuatorPolicy(sampler, spec.io.action_low, spec.io.action_high).eval()
    model = exporter.to_onnx(module, spec.io.obs_dim, (spec.diffusion_steps, spec.io.act_dim), contract_for(spec))
    return spec, module, model


@pytest.mark.parametrize("kind", ["student", "mixture", "mixture from teacher", "mixture, then the teacher's last step", "teacher"])
def test_onnx_matches_torch_and_has_no_random_ops(kind):
    spec, module, model = exported_pair(kind)
    gate = exporter.check_graph(model)
    assert gate["passed"] and gate["random_ops"] == [] and model.ir_version <= 10
    session = make_session(model.SerializeToString())
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((1000, 4)).astype(np.float32) * 3
    noise = rng.standard_normal((1000, 4, 2)).astype(np.float32)
    ours = session.run(None, {"obs": obs, "noise": noise})[0]
    with torch.no_grad():
        ref = module(torch.from_numpy(obs), torch.from_numpy(noise)).numpy()
    assert ours.shape == (1000, 2)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("kind", ["student", "mixture", "mixture from teacher", "mixture, then the teacher's last step", "teacher"])
def test_actions_are_rescaled_to_and_clipped_at_the_actuator_bounds(kind):
    spec, module, model = exported_pair(kind)
    session = make_session(model.SerializeToString())
    for value in (1e6, -1e6):
        obs = np.full((8, 4), value, np.float32)
        noise = np.full((8, 4, 2), value, np.float32)
        action = session.run(None, {"obs": obs, "noise": noise})[0]
        assert np.isfinite(action).all()
        assert (action >= np.array(spec.io.action_low, np.float32)).all() and (action <= np.array(spec.io.action_high, np.float32)).all()
    # The [-1, 1] -> actuator map: low + (a + 1) / 2 * (high - low).
    obs, noise = torch.randn(16, 4), torch.randn(16, 4, 2)
    with torch.no_grad():
        a = module.sampler(obs, noise).clamp(-1, 1).numpy()
    got = session.run(None, {"obs": obs.numpy(), "noise": noise.numpy()})[0]
    expected = np.array([-2.0, 0.0]) + (a + 1) / 2 * np.array([5.0, 0.5])
    assert np.allclose(got, expected, atol=1e-5)


def test_contract_round_trip_and_errors():
    c = contract_for(tiny_spec())
    c.verification = {"parity": {"max_abs_diff": 1e-7}}
    assert ModelContract.from_metadata(c.to_metadata()) == c
    meta = c.to_metadata()
    assert json.loads(meta["qsm_robot.io"]) == TINY_IO.to_dict()
    assert not {"qsm_robot.task", "qsm_robot.obs_dim", "qsm_robot.act_dim", "qsm_robot.action_low"} & set(meta)
    with pytest.raises(ContractError, match="lacks qsm_robot.io"):
        ModelContract.from_metadata({k: v for k, v in meta.items() if k != "qsm_robot.io"})
    with pytest.raises(ContractError, match="contract version 7 is not supported"):
        ModelContract.from_metadata({**meta, "qsm_robot.format_version": "7"})
    bad_io = json.dumps({**TINY_IO.to_dict(), "action_names": ["a0"]})
    with pytest.raises(ContractError, match=r"model metadata qsm_robot\.io: action_low: must have one value per actuator"):
        ModelContract.from_metadata({**meta, "qsm_robot.io": bad_io})


def test_a_version_1_contract_is_refused_with_the_command_that_re_exports_it():
    # The metadata as contract version 1 wrote it: the I/O facts as separate keys, no qsm_robot.io.
    v1 = {"task": "cartpole-swingup", "obs_dim": 5, "obs_layout": [["position", 0, 3], ["velocity", 3, 2]], "act_dim": 1,
          "action_low": [-1.0], "action_high": [1.0], "control_period_s": 0.01, "action_repeat": 1, "sampler": "student",
          "sampler_steps": 1, "teacher_steps": 5, "schedule": "vp", "noise_shape": ["batch", 5, 1],
          "teacher_sha256": "0" * 64, "teacher_step": 0, "verification": {}, "format": "qsm-robot/onnx-policy",
          "format_version": 1}
    with pytest.raises(ContractError) as info:
        ModelContract.from_metadata({f"qsm_robot.{k}": json.dumps(v) for k, v in v1.items()})
    text = str(info.value)
    assert "model contract version 1" in text and "reads version 2" in text
    assert "Re-export the model from its checkpoint" in text and "qsm-export RUN_DIR" in text


def test_cli_exports_a_verified_model_with_its_contract_and_report(run_dir, tmp_path, capsys):
    out = tmp_path / "models" / "tiny.onnx"
    assert export_main([str(run_dir), "--out", str(out), "--min-retention", "0"] + FAST) == 0
    text = capsys.readouterr().out
    assert "qsm-export summary: PASSED" in text and "p99.9" in text
    contract = read_contract(make_session(out))
    assert (contract.io.task, contract.io.obs_dim, contract.io.act_dim, contract.sampler, contract.sampler_steps) == \
        ("cartpole-swingup", 5, 1, "student", 1)
    # The I/O description travels unchanged: make_env -> policy.json -> ONNX metadata.
    assert contract.io == load_policy(run_dir).spec.io == env_info(make_env("cartpole-swingup"))
    assert contract.noise_shape == ["batch", 5, 1] and contract.teacher_step == 300
    assert contract.teacher_sha256 == exporter.teacher_sha256(run_dir / "checkpoints" / "step_000000300")
    assert contract.verification["parity"]["max_abs_diff"] <= 1e-5
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["passed"] and set(report["gates"]) == {"graph", "parity", "retention", "latency", "distribution"}
    assert report["distill_method"] == "mixture" and "distillation      mixture," in text  # the K=1 default
    dist = report["gates"]["distribution"]  # measured on held-out states, reported, not enforced by default
    assert dist["enforced"] is False and dist["states"] == exporter.ExportOptions.fidelity_states and 0 <= dist["w1_mean"] <= dist["w1_worst"] <= 1
    assert "distribution      W1/range mean" in text
    parity = report["gates"]["parity"]  # against float64 torch; tolerance = base + 2 x torch float32's own error
    assert parity["tolerance"] == pytest.approx(parity["base_tolerance"] + 2 * parity["torch_float32_error"])
    assert out.with_suffix(".actions.png").stat().st_size > 10_000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_a_two_step_student_defaults_to_regression_and_can_use_rollout_states_only(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "k2.onnx"
    seeds = []  # the task seeds of every rollout: distillation states, then the gates' held-out episodes
    real_rollout = exporter.rollout

    def recorded_rollout(fn, task, repeat, episodes, seed, *args, **kwargs):
        seeds.append(range(seed, seed + episodes))
        returns = real_rollout(fn, task, repeat, episodes, seed, *args, **kwargs)
        record = args[0] if args else kwargs.get("record")
        recorded.append(sum(map(len, record)) if record is not None else 0)
        return returns

    def recorded_starts(fn, task, repeat, episodes, steps, seed, record):
        starts.append(range(seed, seed + min(episodes, exporter.ROLLOUT_CHUNK)))
        before = sum(map(len, record))
        real_starts(fn, task, repeat, episodes, steps, seed, record)
        visited.extend([before, sum(map(len, record))])  # rollout states, then with the starts'

    def recorded_distill(teacher, states, *args, **kwargs):
        distilled.append(len(states))
        return real_distill(teacher, states, *args, **kwargs)

    starts, visited, distilled, recorded = [], [], [], []
    real_starts, real_distill = exporter.episode_starts, exporter.distill
    monkeypatch.setattr(exporter, "rollout", recorded_rollout)
    monkeypatch.setattr(exporter, "episode_starts", recorded_starts)
    monkeypatch.setattr(exporter, "distill", recorded_distill)
    assert export_main([str(run_dir), "--out", str(out), "--min-retention", "0", "--student-steps", "2",
                        "--replay-states", "0", "--state-episodes", "3"] + FAST[:6] + FAST[8:]) == 0
    # No held-out episode (the retention gate's, whose states the distribution gate uses) is a distillation episode.
    (states, teacher_eval, student_eval) = seeds
    assert len(states) == 3 and teacher_eval == student_eval and not set(states) & set(teacher_eval)
    assert states.start >= teacher_eval.stop  # above them: no number of rollouts reaches a held-out seed
    assert [len(r) for r in starts] == [3] and not set(starts[0]) & (set(states) | set(teacher_eval))  # FAST's --start-episodes 3
    # The starts' 3 x 4 states reach the student once each, after the rollouts' states and their default 3
    # jittered copies (the starts get none: ExportOptions.start_episodes).
    assert visited == [0, 3 * 4] and distilled == [4 * recorded[0] + 3 * 4]
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "(without replay buffer)" in text and "qsm-export summary: PASSED" in text
    assert json.loads(out.with_suffix(".report.json").read_text())["distill_method"] == "regression"
    contract = read_contract(make_session(out))
    assert (contract.sampler, contract.sampler_steps, contract.noise_shape) == ("student", 2, ["batch", 5, 1])
    assert contract.verification["parity"]["max_abs_diff"] <= 1e-5


def test_rollouts_run_in_chunks_with_the_same_seeds_and_states_as_all_at_once(monkeypatch):
    from qsm_robot.envs import run_episodes

    policy = lambda obs: np.tanh(obs[:, :1])  # noqa: E731  (deterministic, state-dependent)
    together: list = []
    expected = run_episodes(policy, [make_env("cartpole-swingup", seed=40 + i, action_repeat=4) for i in range(5)], together)
    monkeypatch.setattr(exporter, "ROLLOUT_CHUNK", 2)
    sizes = []  # envs side by side in each batch: at most ROLLOUT_CHUNK
    monkeypatch.setattr(exporter, "run_episodes", lambda fn, envs, record: sizes.append(len(envs)) or run_episodes(fn, envs, record))
    chunked: list = []
    assert exporter.rollout(policy, "cartpole-swingup", 4, 5, 40, chunked) == expected
    assert sizes == [2, 2, 1]
    assert np.array_equal(np.sort(np.concatenate(chunked), axis=0), np.sort(np.concatenate(together), axis=0))


def test_an_episode_stops_after_max_steps():
    from qsm_robot.envs import run_episodes

    seen: list = []
    returns = run_episodes(lambda obs: np.zeros((len(obs), 1)), [make_env("cartpole-swingup", seed=i) for i in range(3)], seen, max_steps=7)
    assert len(returns) == 3 and [len(batch) for batch in seen] == [3] * 7
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        run_episodes(lambda obs: obs, [], max_steps=0)


def test_episode_starts_reset_a_few_envs_for_many_seeded_starts(monkeypatch):
    built = []
    real_make_env = exporter.make_env
    monkeypatch.setattr(exporter, "make_env", lambda task, seed, **kw: built.append(seed) or real_make_env(task, seed=seed, **kw))
    monkeypatch.setattr(exporter, "ROLLOUT_CHUNK", 2)
    policy = lambda obs: np.tanh(obs[:, :2])  # noqa: E731  (point_mass: two actuators)
    first: list = []
    exporter.episode_starts(policy, "point_mass-easy", 2, 5, 3, 90, first)
    assert built == [90, 91]  # two envs, reset for each round
    assert [len(batch) for batch in first] == [2, 2, 2, 2, 2, 2, 1, 1, 1]  # rounds of 2, 2 and 1 episodes, 3 steps each
    starts = np.concatenate([first[0], first[3], first[6]])  # the first step of each round: five different starts
    assert len(np.unique(starts.round(6), axis=0)) == 5
    again: list = []
    exporter.episode_starts(policy, "point_mass-easy", 2, 5, 3, 90, again)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # the same seeds, the same starts


def test_teacher_export_matches_the_torch_sampler(run_dir, tmp_path):
    out = tmp_path / "teacher.onnx"
    assert export_main([str(run_dir), "--out", str(out), "--teacher", "--min-retention", "0"] + FAST) == 0
    from qsm_robot.qsm.policy import load_policy

    policy = load_policy(run_dir)
    session = make_session(out)
    assert read_contract(session).sampler_steps == 5
    obs, noise = torch.randn(1000, 5), torch.randn(1000, 5, 1)
    with torch.no_grad():
        ref = policy.to_actuator(policy.sample(obs, noise)).numpy()
    assert np.abs(session.run(None, {"obs": obs.numpy(), "noise": noise.numpy()})[0] - ref).max() <= 1e-5


def test_export_reads_the_replay_observations_the_trainer_checkpointed(run_dir):
    from qsm_robot.checkpoint_layout import replay_observations
    from qsm_robot.qsm.policy import resolve_checkpoint
    from qsm_robot.train.checkpoint import load_train_state

    ckpt, state = load_train_state(run_dir)
    obs = replay_observations(resolve_checkpoint(run_dir))
    assert obs is not None and obs.dtype == np.float32 and obs.shape == (300, 5)
    assert np.array_equal(obs, state["replay"]["obs"].numpy())
    picked = exporter.replay_states(ckpt, 50, np.random.default_rng(0))
    assert picked.shape == (50, 5) and all((obs == row).all(1).any() for row in picked)
    assert replay_observations(ckpt.parent) is None  # a folder without a training state


def test_a_broken_student_fails_the_retention_gate_and_leaves_no_file(run_dir, tmp_path, monkeypatch, capsys):
    def broken_distill(teacher, *args, **kwargs):
        student = StudentPolicy(5, 1, 5, steps=1, hidden_dim=8)
        with torch.no_grad():
            student.net[-1].weight.zero_()
            student.net[-1].bias.zero_()  # always the middle action: the pole never swings up
        return student.eval(), [0.0]

    monkeypatch.setattr(exporter, "distill", broken_distill)
    out = tmp_path / "broken.onnx"
    assert export_main([str(run_dir), "--out", str(out)] + FAST) == 1
    assert "gate(s) failed: retention" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert export_main([str(run_dir), "--out", str(out), "--force"] + FAST) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["passed"] is False and report["gates"]["retention"]["passed"] is False
    # The constant student also puts all its mass where the teacher has none: the distribution gate
    # sees it, and refuses the export when it is enforced.
    assert report["gates"]["distribution"]["passed"] is False
    out2 = tmp_path / "enforced.onnx"
    assert export_main([str(run_dir), "--out", str(out2), "--min-retention", "0", "--enforce-distribution"] + FAST) == 1
    assert "gate(s) failed: distribution" in capsys.readouterr().err and not out2.exists()


def test_a_student_that_outputs_nan_is_refused_in_one_line(run_dir, tmp_path, monkeypatch, capsys):
    def nan_distill(teacher, *args, **kwargs):
        student = StudentPolicy(5, 1, 5, steps=1, hidden_dim=8)
        with torch.no_grad():
            student.net[-1].bias.fill_(float("nan"))
        return student.eval(), [0.0]

    monkeypatch.setattr(exporter, "distill", nan_distill)
    out = tmp_path / "nan.onnx"
    assert export_main([str(run_dir), "--out", str(out), "--force"] + FAST) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "non-finite action" in err[-1] and list(tmp_path.iterdir()) == []


def test_parity_gate_catches_a_graph_that_differs_from_torch(run_dir, tmp_path, monkeypatch, capsys):
    real = exporter.to_onnx

    def tampered(module, *args):
        import copy

        other = copy.deepcopy(module)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.05)
        return real(other, *args)

    monkeypatch.setattr(exporter, "to_onnx", tampered)
    assert export_main([str(run_dir), "--out", str(tmp_path / "m.onnx"), "--min-retention", "0"] + FAST) == 1
    assert "gate(s) failed: parity" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def damage(run_dir, tmp_path, how):
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(run_dir, run)
    ckpt = run / "checkpoints" / "step_000000300"
    spec = json.loads((ckpt / "policy.json").read_text())
    if how == "corrupt":
        (ckpt / "policy.safetensors").write_bytes(b"garbage")
    elif how == "version":
        (ckpt / "policy.json").write_text(json.dumps({**spec, "format_version": 3}))
    return run


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("corrupt", "cannot read the policy"),
    ("version", "policy format version 3 is not supported"),
    ("K>T", "--student-steps must be in 1..5"),
    ("mixture K=2", "mixture makes one network evaluation per action"),
    ("unwritable", "cannot write to"),
    ("suffix", "must name a .onnx file"),
    ("selected teacher", "--teacher exports the plain T-step chain"),
    ("selected regression", "--distill-method regression regresses onto the teacher's chain"),
    ("teacher init, regression", "--student-init teacher starts a mixture student; this export distils --distill-method regression"),
    ("teacher init, teacher export", "--student-init teacher starts a mixture student; --teacher exports"),
])
def test_bad_input_is_one_clear_line(run_dir, tmp_path, capsys, case, message):
    source, out, extra = str(run_dir), tmp_path / "m.onnx", []
    if case == "missing":
        source = str(tmp_path / "nope")
    elif case in ("corrupt", "version"):
        source = str(damage(run_dir, tmp_path, case))
    elif case == "K>T":
        extra = ["--student-steps", "6"]
    elif case == "mixture K=2":
        extra = ["--student-steps", "2", "--distill-method", "mixture"]
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "m.onnx"
    elif case == "suffix":
        out = tmp_path / "m.pt"
    elif case == "selected teacher":
        extra = ["--action-samples", "4", "--teacher"]
    elif case == "selected regression":
        extra = ["--action-samples", "4", "--distill-method", "regression"]
    elif case == "teacher init, regression":
        extra = ["--student-init", "teacher", "--distill-method", "regression"]
    elif case == "teacher init, teacher export":
        extra = ["--student-init", "teacher", "--teacher"]
    fast = FAST[:4] + FAST[6:] if "--student-init" in extra else FAST  # without --student-hidden, which it refuses
    assert export_main([source, "--out", str(out)] + extra + fast) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--replay-states", "-1"), ("--state-episodes", "0"), ("--min-retention", "2"),
                                        ("--start-episodes", "-1"), ("--start-steps", "0"),
                                        ("--state-jitter-copies", "-1"), ("--state-jitter", "-0.1"),
                                        ("--action-samples", "0")])
def test_out_of_range_options_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["run", "--out", "m.onnx", flag, value])
    assert exit_info.value.code == 2 and f"{flag} must be" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--student-hidden", "64"), ("--student-layers", "3"), ("--student-activation", "relu")])
def test_a_teacher_started_student_refuses_a_shape_of_its_own(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["run", "--out", "m.onnx", "--student-init", "teacher", flag, value])
    assert exit_info.value.code == 2 and f"from the teacher; drop {flag}" in capsys.readouterr().err


def test_contract_and_runtime_import_no_torch():
    code = ("import sys, qsm_robot.export.contract, qsm_robot.export.runtime; "
            "bad = [m for m in ('torch', 'mujoco', 'dm_control', 'gymnasium') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_names_each_default_and_no_default_of_none(capsys):
    with pytest.raises(SystemExit) as exit_:
        export_main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert "student MLP width (default: 256)" in text and "(default: 3000; ot 20000;" in text
