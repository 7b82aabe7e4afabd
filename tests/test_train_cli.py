"""qsm-train end to end: a smoke run, exact resume, bad input, signals and kill -9."""

import csv
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import QSM_TRAIN, REPO
from safetensors.torch import load_file

from qsm_robot.cli.train import main
from qsm_robot.qsm.policy import load_policy
from qsm_robot.train.checkpoint import load_train_state

SMOKE = ["--preset", "smoke", "--threads", "1"]


def test_smoke_run_writes_a_complete_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(SMOKE + ["--steps", "1200", "--eval-every", "600", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "qsm-train summary" in out and str(run / "learning_curve.png") in out
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "smoke" and config["hidden_dim"] == 32 and config["steps"] == 1200
    evals = list(csv.DictReader(open(run / "eval.csv")))
    assert [int(r["step"]) for r in evals] == [600, 1200]
    assert all(0.0 <= float(r["saturated"]) <= 1.0 for r in evals)
    episodes = list(csv.DictReader(open(run / "episodes.csv")))
    assert [int(r["length"]) for r in episodes] == [1000]
    train_rows = list(csv.DictReader(open(run / "train.csv")))
    assert [int(r["step"]) for r in train_rows] == list(range(100, 1201, 100))
    assert float(train_rows[-1]["critic_loss"]) >= 0
    assert (run / "learning_curve.png").stat().st_size > 10_000
    assert any((run / "tb").iterdir())
    policy = load_policy(run)
    assert policy.spec.step == 1200 and policy.spec.task == "cartpole-swingup"
    assert policy.act(torch.zeros(3, 5)).shape == (3, 1)


@pytest.mark.parametrize("learner", [[], ["--n-step", "3", "--critic-layer-norm", "--q-grad-normalize"]],
                         ids=["card", "n-step-layernorm-scale-free"])
def test_resume_is_bit_exact(tmp_path, learner):
    """With 3-step returns the checkpoint mid-episode holds pending starts, and the scale-free
    target a running RMS: both must be restored."""
    common = SMOKE + ["--checkpoint-every", "250", "--eval-every", "400", "--learning-starts", "150"] + learner
    assert main(common + ["--steps", "700", "--run-dir", str(tmp_path / "a")]) == 0
    assert main(common + ["--steps", "350", "--run-dir", str(tmp_path / "b")]) == 0
    assert main(["--resume", str(tmp_path / "b"), "--steps", "700"]) == 0
    ca, sa = load_train_state(tmp_path / "a")
    cb, sb = load_train_state(tmp_path / "b")
    assert ca.name == cb.name == "step_000000700"
    pa, pb = load_file(str(ca / "policy.safetensors")), load_file(str(cb / "policy.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ta, tb = load_file(str(ca / "train_state.safetensors")), load_file(str(cb / "train_state.safetensors"))
    # Evaluation draws from its own generator, so an extra final eval in run b changes only it.
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert differ == ["state.eval_generator"]
    assert sa["numpy_rng"] == sb["numpy_rng"] and sa["env"] == sb["env"]
    steps_logged = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "train.csv"))]
    assert steps_logged == list(range(100, 701, 100))


def test_resume_can_move_a_run_to_another_device(tmp_path):
    run = tmp_path / "run"
    assert main(SMOKE + ["--steps", "300", "--run-dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "device": "cuda"}))  # as if trained on a GPU
    assert main(["--resume", str(run), "--steps", "400", "--device", "cpu"]) == 0
    assert load_policy(run, device="cpu").spec.step == 400


@pytest.mark.parametrize("args,message", [
    (["--steps", "-5"], "steps: must be >= 1"),
    (["--diffusion-steps", "0"], "diffusion_steps: T must be >= 1"),
    (["--schedule", "sigmoid"], "schedule: must be one of vp, linear, cosine"),
    (["--device", "tpu"], "device: must be auto, cpu, cuda"),
    (["--task", "cartpole-swing"], "task: unknown task 'cartpole-swing'; valid tasks"),
    (["--preset", "huge"], "preset: unknown preset 'huge'"),
    (["--gamma", "1.5"], "gamma: must be in [0, 1]"),
])
def test_bad_input_is_rejected_before_any_work(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert main(SMOKE + args + ["--run-dir", str(run)]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(SMOKE + ["--device", "cuda", "--run-dir", str(tmp_path / "r")]) == 2
    assert "device: 'cuda' asked for, but torch sees no CUDA device" in capsys.readouterr().err


def test_existing_run_and_bad_resume_are_rejected(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(SMOKE + ["--steps", "250", "--run-dir", str(run)]) == 0
    assert main(SMOKE + ["--steps", "250", "--run-dir", str(run)]) == 2
    assert f"already holds a run: continue it with --resume {run}" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["--resume", str(run), "--hidden-dim", "64"]) == 2
    assert "only --steps and --device may be given" in capsys.readouterr().err


def start_training(run, cli_env, steps="100000"):
    return subprocess.Popen(
        QSM_TRAIN + SMOKE + ["--steps", steps, "--checkpoint-every", "100", "--eval-every", "100000", "--run-dir", str(run)],
        cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_checkpoint(run, at_least, proc, timeout=120):
    latest = run / "checkpoints" / "latest.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if latest.exists() and json.loads(latest.read_text())["step"] >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step >= {at_least} within {timeout} s")


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, cli_env):
    run = tmp_path / "run"
    proc = start_training(run, cli_env)
    wait_for_checkpoint(run, 300, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped_at = int(err.split("stopped at step ")[1].split()[0])
    assert f"qsm-train --resume {run}" in err
    assert load_policy(run).spec.step == stopped_at  # the checkpoint is at the exact stop step


def test_kill_9_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path, cli_env):
    run = tmp_path / "run"
    proc = start_training(run, cli_env)
    wait_for_checkpoint(run, 400, proc)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    _, state = load_train_state(run)  # the latest checkpoint is whole
    saved = state["step"]
    assert saved >= 400 and saved % 100 == 0
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    done = subprocess.run(QSM_TRAIN + ["--resume", str(run), "--steps", str(saved + 150)],
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} at step {saved}" in done.stderr
    assert load_policy(run).spec.step == saved + 150
    # A kill in the middle of a write may leave a temporary folder; it is never the latest.
    assert all(name.startswith(".tmp-step_") for name in leftovers)


def test_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--task", "--steps", "--seed", "--device", "--preset", "--run-dir", "--q-grad-scale", "--schedule"):
        assert flag in out
    assert "M_q: the denoiser is regressed onto" in out
    # Both ways to call it, units named, and no stray markup.
    assert "qsm-train --resume RUN_DIR [--steps N] [--device D]" in out and "``" not in out
    assert "Policy steps (actions) in the whole run" in out


def test_threads_default_to_the_cpus_this_process_may_use():
    """threads=0 follows the affinity mask, so runs pinned side by side do not oversubscribe."""
    import os

    from qsm_robot.config import available_cpus, resolve_threads

    assert available_cpus() == len(os.sched_getaffinity(0))
    assert resolve_threads(0) == available_cpus()
    assert resolve_threads(3) == 3
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mask)})
        assert resolve_threads(0) == 1
    finally:
        os.sched_setaffinity(0, mask)


@pytest.mark.parametrize("name", ["reference", "fast", "strong", "scalefree", "scalefree-utd2", "smoke"])
def test_every_preset_is_a_valid_config_that_differs_from_the_card_as_documented(name):
    from qsm_robot.config import PRESETS, TrainConfig, preset_config

    assert set(PRESETS) == {"reference", "fast", "strong", "scalefree", "scalefree-utd2", "smoke"}  # the README's table
    cfg = preset_config(name).validate()
    card = TrainConfig()
    differs = {f for f in PRESETS[name] if getattr(cfg, f) != getattr(card, f)}
    assert differs == set(PRESETS[name])  # no preset entry restates a card default
    assert cfg.preset == name
