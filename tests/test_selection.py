"""Q-selected sampling (qsm_robot.qsm.selection): the pick, the policy wrapper, loading the critics,
training's evaluation policy, and qsm-export distilling the selected policy."""

import json

import pytest
import torch
from safetensors.numpy import load_file as load_np, save_file as save_np
from safetensors.torch import load_file
from torch import nn

from qsm_robot.checkpoint_layout import CRITIC_STATE, STATE_PREFIX
from qsm_robot.cli.export import main as export_main
from qsm_robot.cli.train import main as train_main
from qsm_robot.config import ConfigError, preset_config
from qsm_robot.export.exporter import ExportError, ExportOptions, teacher_sha256
from qsm_robot.policy_io import PolicyIO
from qsm_robot.qsm.networks import CriticEnsemble
from qsm_robot.qsm.policy import CheckpointError, DiffusionPolicy, PolicySpec, load_policy, resolve_checkpoint
from qsm_robot.qsm.selection import QSelectedPolicy, best_of, load_critic, load_selected_policy, run_action_samples
from qsm_robot.train.checkpoint import load_train_state


class TableCritic(nn.Module):
    """Two critics whose values are fixed functions of the first action coordinate."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, obs, act):
        return torch.stack([self.first(act[:, 0]), self.second(act[:, 0])])


class NoCritic(nn.Module):
    def forward(self, obs, act):
        raise AssertionError("one sample needs no critic")


def test_best_of_picks_the_candidate_of_highest_mean_critic_value_per_state():
    candidates = torch.tensor([[0.1], [0.5], [-0.3], [0.9], [0.0], [-0.8]])  # state 0: rows 0-2, state 1: rows 3-5
    draw = lambda o: candidates[: len(o)]  # noqa: E731
    # Critic 0 is largest at -0.3 / -0.8 by a lot, critic 1 largest at 0.5 / 0.9 by a little: the mean follows
    # critic 0 (the minimum over critics would follow critic 1).
    critic = TableCritic(lambda a: -10 * a, lambda a: a)
    picked = best_of(torch.zeros(2, 3), draw, critic, samples=3)
    assert torch.equal(picked, torch.tensor([[-0.3], [-0.8]]))
    # One critic's preference alone, the other constant: its argmax.
    picked = best_of(torch.zeros(2, 3), draw, TableCritic(lambda a: -(a - 0.4) ** 2, lambda a: 0 * a), samples=3)
    assert torch.equal(picked, torch.tensor([[0.5], [0.0]]))


def test_one_sample_is_the_plain_draw_and_asks_no_critic():
    obs = torch.randn(5, 3)
    assert torch.equal(best_of(obs, lambda o: o[:, :2] * 2, NoCritic(), samples=1), obs[:, :2] * 2)


def tiny_policy() -> DiffusionPolicy:
    io = PolicyIO(task="tiny", obs=(("x", 3),), action_names=("a0", "a1"), action_low=(-1.0, -1.0),
                  action_high=(1.0, 1.0), control_period_s=0.01, action_repeat=1, episode_steps=100).validate()
    spec = PolicySpec(io=io, hidden_dim=16, num_layers=2, time_dim=8, fourier_dim=4, schedule="vp",
                      diffusion_steps=4, temperature=1.0, clip_sample=True, step=0)
    torch.manual_seed(0)
    return DiffusionPolicy(spec).eval()


def test_selected_policy_is_deterministic_in_its_noise_and_picks_among_its_own_chains():
    policy = tiny_policy()
    critic = TableCritic(lambda a: a, lambda a: a)  # prefers the largest first coordinate
    selected = QSelectedPolicy(policy, critic, samples=8)
    assert selected.noise_shape == (32, 2) and selected.spec is policy.spec
    obs, noise = torch.randn(6, 3), torch.randn(6, 32, 2)
    action = selected.sample(obs, noise)
    assert torch.equal(action, selected.sample(obs, noise))
    with torch.no_grad():  # candidate n of state b: the chain on noise rows n*T .. n*T+T-1 of state b
        chains = policy.sample(obs.repeat_interleave(8, 0), noise.reshape(48, 4, 2)).view(6, 8, 2)
    best = chains[:, :, 0].argmax(dim=1)
    assert torch.equal(action, chains[torch.arange(6), best])
    # The chosen candidate's whole chain: its last row is the action, and it is that candidate's chain.
    chain = selected.chain(obs, noise)
    assert chain.shape == (6, 5, 2) and torch.equal(chain[:, -1], action)
    with torch.no_grad():
        all_chains = policy.chain(obs.repeat_interleave(8, 0), noise.reshape(48, 4, 2)).view(6, 8, 5, 2)
    assert torch.equal(chain, all_chains[torch.arange(6), best])
    # Against the plain policy on many states: the selected first coordinate is higher on average.
    many = torch.randn(512, 3)
    gen = torch.Generator().manual_seed(1)
    assert selected.act(many, gen)[:, 0].mean() > policy.act(many, gen)[:, 0].mean() + 0.2
    with pytest.raises(ValueError, match="action samples must be >= 1"):
        QSelectedPolicy(policy, critic, samples=0)


def train(run, *extra):
    assert train_main(["--preset", "smoke", "--steps", "300", "--learning-starts", "100", "--eval-every", "150",
                       "--threads", "1", "--run-dir", str(run), *extra]) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs, the same but for the evaluation policy: plain samples and best of 4."""
    root = tmp_path_factory.mktemp("selection")
    return train(root / "plain"), train(root / "best4", "--eval-action-samples", "4")


def test_the_evaluation_policy_changes_the_evaluations_and_nothing_that_is_learnt(runs):
    plain, best4 = (resolve_checkpoint(r) for r in runs)
    assert load_file(str(plain / "policy.safetensors")).keys() == load_file(str(best4 / "policy.safetensors")).keys()
    for name, weights in load_file(str(plain / "policy.safetensors")).items():
        assert torch.equal(weights, load_file(str(best4 / "policy.safetensors"))[name]), name
    critics = [load_train_state(c)[1][CRITIC_STATE] for c in (plain, best4)]
    assert all(torch.equal(critics[0][k], critics[1][k]) for k in critics[0])
    evals = [[line.split(",")[2] for line in (r / "eval.csv").read_text().splitlines()[1:]] for r in runs]
    assert len(evals[0]) == len(evals[1]) == 2 and evals[0] != evals[1]
    assert json.loads((runs[1] / "config.json").read_text())["eval_action_samples"] == 4
    assert (run_action_samples(runs[0]), run_action_samples(runs[1])) == (1, 4)


def test_load_critic_is_the_trained_critic_with_or_without_layer_norm(runs, tmp_path):
    ckpt, state = load_train_state(runs[0])
    critic = load_critic(runs[0])
    assert isinstance(critic, CriticEnsemble) and not critic.training
    assert all(torch.equal(v, state[CRITIC_STATE][k]) for k, v in critic.state_dict().items())
    normed = train(tmp_path / "ln", "--critic-layer-norm", "--steps", "200")
    _, state = load_train_state(normed)
    assert all(torch.equal(v, state[CRITIC_STATE][k]) for k, v in load_critic(normed).state_dict().items())
    assert len(state[CRITIC_STATE]) > len(critic.state_dict())  # the LayerNorm's parameters were found and loaded
    assert isinstance(load_selected_policy(runs[0], 1), DiffusionPolicy)
    assert load_selected_policy(runs[0], 3).samples == 3


def test_a_checkpoint_without_training_state_or_with_a_bad_config_is_a_clear_error(runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs[1], run)
    ckpt = resolve_checkpoint(run)
    (run / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "eval_action_samples": 0}))
    with pytest.raises(CheckpointError, match="eval_action_samples must be an integer >= 1"):
        run_action_samples(run)
    (ckpt / "train_state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no critics"):
        load_critic(run)


def test_the_config_refuses_zero_samples_and_the_competing_preset_selects():
    with pytest.raises(ConfigError, match="eval_action_samples: must be >= 1"):
        preset_config("smoke", eval_action_samples=0).validate()
    assert preset_config("scalefree-utd2").eval_action_samples == 16
    assert preset_config("reference").eval_action_samples == 1


FAST = ["--distill-iterations", "150", "--distill-batch", "128", "--student-hidden", "32", "--state-episodes", "1",
        "--eval-episodes", "2", "--latency-calls", "200", "--threads", "1", "--min-retention", "0", "--start-episodes", "0"]


def test_export_distils_the_runs_own_evaluation_policy_by_default(runs, tmp_path, capsys):
    out = tmp_path / "best4.onnx"
    assert export_main([str(runs[1]), "--out", str(out)] + FAST) == 0
    text = capsys.readouterr().out
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["action_samples"] == 4 and report["distill_method"] == "mixture"
    assert "teacher: best of 4 samples under the critics" in text
    assert report["gates"]["distribution"]["states"] == ExportOptions.fidelity_states  # measured against the selected teacher
    # The exported model's noise input is the student's own, one chain's shape.
    from qsm_robot.export.runtime import make_session, read_contract
    contract = read_contract(make_session(out))
    assert contract.noise_shape == ["batch", 5, 1]
    # The contract names the teacher it was distilled from: the policy and, selected, its critics.
    ckpt = resolve_checkpoint(runs[1])
    assert contract.teacher_sha256 == teacher_sha256(ckpt, 4) != teacher_sha256(ckpt, 1)
    # --action-samples 1 overrides the run's setting.
    assert export_main([str(runs[1]), "--out", str(tmp_path / "plain.onnx"), "--action-samples", "1"] + FAST) == 0
    assert json.loads((tmp_path / "plain.report.json").read_text())["action_samples"] == 1
    assert read_contract(make_session(tmp_path / "plain.onnx")).teacher_sha256 == teacher_sha256(ckpt, 1)


def test_a_selected_teachers_hash_follows_its_critics_and_the_plain_ones_does_not(runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs[1], run)
    ckpt = resolve_checkpoint(run)
    plain, selected = teacher_sha256(ckpt, 1), teacher_sha256(ckpt, 4)
    assert plain != selected and teacher_sha256(ckpt, 16) == selected  # the hash names the files, not N
    tensors = load_np(str(ckpt / "train_state.safetensors"))
    critic_key = next(k for k in sorted(tensors) if k.startswith(f"{STATE_PREFIX}.{CRITIC_STATE}."))
    tensors[critic_key] = tensors[critic_key] + 1e-3
    save_np(tensors, str(ckpt / "train_state.safetensors"))
    assert teacher_sha256(ckpt, 1) == plain and teacher_sha256(ckpt, 4) != selected
    (ckpt / "train_state.safetensors").unlink()
    with pytest.raises(ExportError, match="holds no critics"):
        teacher_sha256(ckpt, 4)
