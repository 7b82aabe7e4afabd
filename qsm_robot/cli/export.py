"""``qsm-export``: distil a qsm-train policy into a K-step student and write a verified ONNX file.

    qsm-export runs/my-run --out deploy/models/cartpole.onnx                 # K=1 student
    qsm-export runs/my-run --out deploy/models/cartpole-k2.onnx --student-steps 2
    qsm-export runs/my-run/checkpoints/step_000050000 --out teacher.onnx --teacher

The model's metadata carries the checkpoint's I/O description unchanged (``qsm_robot.io``, contract
version 2); qsm-serve refuses a model of contract version 1: re-export it with this command. A
checkpoint whose policy.json is format version 1 is read by rebuilding that description from its
task and checking it against the facts the file stored (qsm_robot/qsm/policy.py).

Exit codes: 0 written and verified, 1 a gate failed (nothing written), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qsm_robot.export.exporter import ExportOptions

PROG = "qsm-export"


def _per_method(name: str) -> str:
    """'3000; ot 20000': a distillation default that depends on --distill-method, for --help."""
    from qsm_robot.export.student import DEFAULTS, METHOD_DEFAULTS

    own = [f"{m} {v[name]}" for m, v in METHOD_DEFAULTS.items() if name in v]
    return "; ".join([str(DEFAULTS[name]), *own])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, except a flag whose default is None: its help says
    what happens without it (argparse would print "(default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse(argv: list[str]) -> tuple[str, "ExportOptions", int]:
    from qsm_robot.export.exporter import ExportOptions
    from qsm_robot.export.fidelity import FidelityThresholds
    from qsm_robot.export.student import ACTIVATIONS, INITS, METHODS

    d = ExportOptions(out=Path("x.onnx"))
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].strip("`").split(": ", 1)[1],
                                formatter_class=_HelpFormatter)
    p.add_argument("source", help="a qsm-train run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="the .onnx file to write (report and plot go beside it)")
    p.add_argument("--student-steps", type=int, default=d.student_steps, help="K: network evaluations of the student (K < T)")
    p.add_argument("--teacher", action="store_true", help="export the full T-step DDPM chain instead of a student")
    p.add_argument("--force", action="store_true", help="write the model even when a gate fails")
    p.add_argument("--distill-iterations", type=int, default=d.distill_iterations, help="student training iterations (default: " + _per_method("iterations") + ")")
    p.add_argument("--distill-batch", type=int, default=d.distill_batch, help="states per distillation iteration (ot, mixture: rows of their fixed training sets)")
    # None: the default below, or the teacher's with --student-init teacher (which refuses them).
    p.add_argument("--student-hidden", type=int, help=f"student MLP width (default: {d.student_hidden})")
    p.add_argument("--student-layers", type=int, help=f"student hidden layers (default: {d.student_layers})")
    p.add_argument("--student-activation", choices=list(ACTIVATIONS),
                   help=f"student activation (relu fuses into the Gemm in onnxruntime: fastest) (default: {d.student_activation})")
    p.add_argument("--student-init", choices=list(INITS), default=d.student_init,
                   help="how the student's weights start: random, or teacher (a mixture student whose hidden layers "
                        "start as the teacher's first denoising step, with the teacher's width, depth and Mish)")
    p.add_argument("--distill-method", choices=list(METHODS), default=d.distill_method,
                   help="distillation objective (default: mixture for --student-steps 1, regression above): mixture (a mixture of Gaussians per state fitted to teacher samples "
                        "by maximum likelihood; the noise picks a component, then a point in it), mixture-last (the same "
                        "mixture fitted to the teacher's chain before its last step, then the teacher's own last step), "
                        "regression (shared noise, squared error), l1 (shared noise, absolute "
                        "error), stepwise (each of the K student steps onto its stretch of the teacher's chain), "
                        "energy (the energy score on independent draws) or ot (a map of a_T, paired with teacher "
                        "samples by optimal transport); docs/EXPORT.md")
    p.add_argument("--fidelity-states", type=int, default=d.fidelity_states,
                   help="held-out states (evaluation episodes) for the distribution gate")
    p.add_argument("--fidelity-samples", type=int, default=d.fidelity_samples, help="actions per state and sampler")
    p.add_argument("--max-w1", type=float, default=d.fidelity.w1_mean,
                   help="gate: mean over states of the Wasserstein-1 distance / actuator range, above the teacher-vs-itself floor")
    p.add_argument("--max-w1-worst", type=float, default=d.fidelity.w1_worst, help="gate: the worst state's W1 / range")
    p.add_argument("--max-off-support", type=float, default=d.fidelity.off_support_mean,
                   help="gate: mean share of exported samples where the teacher has no mass")
    p.add_argument("--enforce-distribution", action="store_true",
                   help="refuse the export when the distribution gate fails (default: report it and warn)")
    p.add_argument("--distill-draws", type=int, default=d.distill_draws,
                   help="samples per state for the methods that compare distributions (energy, ot, mixture; default: "
                        + _per_method("draws") + ")")
    p.add_argument("--state-episodes", type=int, default=d.state_episodes, help="teacher rollouts that provide distillation states (run 64 at a time)")
    p.add_argument("--start-episodes", type=int, default=d.start_episodes,
                   help="more teacher episodes whose first --start-steps steps join the distillation states (0: none)")
    p.add_argument("--start-steps", type=int, default=d.start_steps, help="policy steps of each of the --start-episodes")
    p.add_argument("--replay-states", type=int, default=d.replay_states,
                   help="at most this many replay-buffer observations join the rollout states (0: none)")
    p.add_argument("--state-jitter-copies", type=int, default=d.state_jitter_copies,
                   help="copies of each rollout and replay state (not the episode starts) moved by Gaussian noise, labelled by the teacher (0: none)")
    p.add_argument("--state-jitter", type=float, default=d.state_jitter,
                   help="the copies' noise as a fraction of the states' per-dimension standard deviation")
    p.add_argument("--eval-episodes", type=int, default=d.eval_episodes, help="episodes for the return-retention gate")
    p.add_argument("--min-retention", type=float, default=d.min_retention, help="gate: exported mean return / teacher mean return")
    p.add_argument("--parity-samples", type=int, default=d.parity_samples, help="(obs, noise) pairs for the parity gate")
    p.add_argument("--parity-tol", type=float, default=d.parity_tol, help="gate: max |onnxruntime - torch|")
    p.add_argument("--latency-calls", type=int, default=d.latency_calls, help="batch-1 calls timed")
    p.add_argument("--action-samples", type=int, default=d.action_samples,
                   help="the policy to distil: the best of N diffusion samples under the run's critics (1: plain "
                        "samples; default: the run's own evaluation policy, its eval_action_samples)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for distillation (0: the CPUs this process may run on)")
    a = p.parse_args(argv)
    for name in ("distill_iterations", "distill_batch", "distill_draws", "student_hidden", "student_layers", "state_episodes", "start_steps",
                 "eval_episodes", "parity_samples", "latency_calls", "fidelity_states", "fidelity_samples", "action_samples"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("start_episodes", "replay_states", "state_jitter_copies", "state_jitter"):
        if not getattr(a, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if not 0 <= a.min_retention <= 1:
        p.error(f"--min-retention must be in [0, 1], got {a.min_retention}")
    for name in ("max_w1", "max_w1_worst", "max_off_support"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    shape = {"student_hidden": a.student_hidden, "student_layers": a.student_layers, "student_activation": a.student_activation}
    if a.student_init == "teacher":
        given = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is not None]
        if given:
            p.error(f"--student-init teacher takes the student's width, depth and activation from the teacher; drop {', '.join(given)}")
    shape = {k: getattr(d, k) if v is None else v for k, v in shape.items()}
    opts = ExportOptions(
        out=a.out, student_steps=a.student_steps, teacher=a.teacher, force=a.force,
        distill_iterations=a.distill_iterations, distill_batch=a.distill_batch, **shape, student_init=a.student_init,
        state_episodes=a.state_episodes, start_episodes=a.start_episodes, start_steps=a.start_steps,
        replay_states=a.replay_states,
        state_jitter_copies=a.state_jitter_copies, state_jitter=a.state_jitter, eval_episodes=a.eval_episodes,
        min_retention=a.min_retention, parity_samples=a.parity_samples, parity_tol=a.parity_tol,
        latency_calls=a.latency_calls, seed=a.seed, progress=sys.stderr.isatty(), distill_method=a.distill_method, distill_draws=a.distill_draws,
        fidelity_states=a.fidelity_states, fidelity_samples=a.fidelity_samples,
        fidelity=FidelityThresholds(w1_mean=a.max_w1, w1_worst=a.max_w1_worst, off_support_mean=a.max_off_support),
        enforce_distribution=a.enforce_distribution, action_samples=a.action_samples,
    )
    return a.source, opts, a.threads


def summary(report) -> str:
    g = report.gates
    ret = g["retention"]
    lines = [
        "", f"== qsm-export summary: {'PASSED' if report.passed else 'FAILED'} ==",
        f"model             {report.model} ({report.sampler}, {report.sampler_steps} step(s))",
        f"graph             checker ok, onnxruntime loads, random ops: {g['graph']['random_ops'] or 'none'}"
        f"  [{'ok' if g['graph']['passed'] else 'FAIL'}]",
        f"parity            max |onnxruntime - torch float64| = {g['parity']['max_abs_diff']:.2e} over "
        f"{g['parity']['samples']} pairs (gate {g['parity']['tolerance']:.1e} = {g['parity']['base_tolerance']:.0e} + 2 x "
        f"torch float32's own error {g['parity']['torch_float32_error']:.1e})  [{'ok' if g['parity']['passed'] else 'FAIL'}]",
    ]
    if "distribution" in g:
        d, th = g["distribution"], g["distribution"]["thresholds"]
        lines.append(
            f"distribution      W1/range mean {d['w1_mean']:.3f} (gate {th['w1_mean']}), worst state {d['w1_worst']:.3f} "
            f"(gate {th['w1_worst']}); off-support {100 * d['off_support_mean']:.1f}% (gate {100 * th['off_support_mean']:g}%) "
            f"over {d['states']} held-out states; teacher vs itself {d['floor_w1_mean']:.3f} (thresholds are excesses "
            f"over it)  [{'ok' if d['passed'] else ('FAIL' if d['enforced'] else 'WARNING: not enforced')}]")
    r = "n/a" if ret["retention"] is None else f"{100 * ret['retention']:.1f}%"
    lines += [
        f"return retention  {report.student_return_mean:.1f} exported vs {report.teacher_return_mean:.1f} teacher = {r} "
        f"(gate {100 * ret['min_retention']:.0f}%)  [{'ok' if ret['passed'] else 'FAIL'}]",
        f"latency (batch 1) p50 {g['latency']['p50_us']} us, p99 {g['latency']['p99_us']} us, "
        f"p99.9 {g['latency']['p99.9_us']} us over {g['latency']['calls']} calls, 1 thread",
    ]
    if report.distill_seconds is not None:
        teacher = f"; teacher: best of {report.action_samples} samples under the critics" if report.action_samples > 1 else ""
        lines.append(f"distillation      {report.distill_method}, {report.distill_seconds} s, final loss "
                     f"{report.distill_final_loss:.2e}{teacher}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    source, opts, threads = parse(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        print(f"{PROG}: error: {exc.name} is not installed: pip install \".[export,deploy]\" "
              "(or .[export,gpu] for onnxruntime-gpu)", file=sys.stderr)
        return 2
    import torch

    from qsm_robot.config import resolve_threads
    from qsm_robot.export.exporter import ExportError, export_policy

    torch.set_num_threads(resolve_threads(threads))
    try:
        report = export_policy(source, opts, log=lambda m: print(m, file=sys.stderr))
    except ExportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1 if "gate(s) failed" in str(exc) else 2
    print(summary(report))
    out = Path(report.model)
    print(f"report            {out.with_suffix('.report.json')}\nplot              {out.with_suffix('.actions.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
