"""Update-throughput benchmark: QSM updates per second at reference sizes, beside the machine's
ceiling for the same work (the update's matrix multiplies alone).

    python -m benchmarks.update_throughput                 # CPU, 2 threads; CUDA too if present
    python -m benchmarks.update_throughput --hidden-dim 256 --task walker-walk

Prints a table and writes benchmarks/results/throughput_*.csv and .png.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python benchmarks/update_throughput.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_csv
from qsm_robot.config import preset_config
from qsm_robot.envs import env_info, make_env
from qsm_robot.qsm.learner import QSMLearner
from qsm_robot.train.loop import learner_config

OUT = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, device, n: int, repeats: int) -> list[float]:
    """Calls per second of ``fn`` over ``repeats`` timed blocks of ``n`` calls after a warm-up."""
    for _ in range(max(5, n // 10)):
        fn()
    sync(device)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        rates.append(n / (time.perf_counter() - t))
    return rates


def update_gemms(B: int, H: int, obs: int, act: int, T: int, time_dim: int, device) -> list[tuple]:
    """The (m, k, n) shapes of the matrix multiplies one QSM update performs (2 critics)."""
    critic_in = obs + act
    critic_fwd = [(B, critic_in, H), (B, H, H), (B, H, 1)]
    critic_wgrad = [(critic_in, B, H), (H, B, H), (H, B, 1)]
    critic_xgrad = [(B, 1, H), (B, H, H)]  # the input layer's input gradient w.r.t. s is not needed...
    critic_agrad = [(B, H, critic_in)]      # ...but the action gradient g is
    den_fwd = [(B, obs, H), (B, act, H), (B, time_dim, time_dim), (B, time_dim, H), (B, H, H), (B, H, act)]
    den_wgrad = [(H, B, act), (H, B, H), (H, B, time_dim), (time_dim, B, time_dim), (H, B, obs), (H, B, act)]
    den_xgrad = [(B, act, H), (B, H, H), (B, H, time_dim), (B, time_dim, time_dim)]
    sampler = [(B, obs, H)] + T * [(B, act, H), (B, H, H), (B, H, act)]
    shapes = sampler + 2 * critic_fwd                                      # target y
    shapes += 2 * (critic_fwd + critic_wgrad + critic_xgrad)                # critic step
    shapes += 2 * (critic_fwd + critic_xgrad + critic_agrad)                # g = grad_a Q
    shapes += den_fwd + den_wgrad + den_xgrad                               # actor step
    return [(torch.randn(m, k, device=device), torch.randn(k, n, device=device)) for m, k, n in shapes]


def loop_throughput(task: str, preset: str, steps: int, threads: int) -> dict:
    """Frames per second of the whole training loop of ``preset`` (random steps first, then act,
    env step, store, update; an evaluation every third of the run and at the end), and the share
    of the wall time that evaluation took."""
    import tempfile

    from qsm_robot.train.loop import Trainer, prepare_run_dir

    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset_config(preset, task=task, steps=steps, learning_starts=steps // 6, eval_every=steps // 3,
                            checkpoint_every=10**9, threads=threads, run_dir=f"{tmp}/run")
        trainer = Trainer(cfg, prepare_run_dir(cfg))
        evaluate, eval_s = trainer.evaluate, []

        def timed_evaluate() -> float:
            t = time.perf_counter()
            out = evaluate()
            eval_s.append(time.perf_counter() - t)
            return out

        trainer.evaluate = timed_evaluate
        result = trainer.run()
    frames = result.step * cfg.action_repeat
    return {"loop": f"{preset} preset, {task}", "policy_steps": result.step, "frames": frames,
            "wall_s": round(result.wall_s, 1), "frames_per_s": round(frames / result.wall_s, 1),
            "updates_per_s": round(result.updates_per_s, 1), "evaluations": len(eval_s),
            "eval_share": round(sum(eval_s) / result.wall_s, 3),
            "eval_episodes": cfg.eval_episodes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="cartpole-swingup")
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--diffusion-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--updates", type=int, default=200, help="updates per timed block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-preset", default="strong",
                   help="also time the whole training loop (act, step, store, update, evaluate) of this preset")
    p.add_argument("--loop-steps", type=int, default=3000, help="policy steps of that loop run (0: skip it)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = env_info(make_env(args.task, seed=0))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    rows = []
    for device in devices:
        cfg = preset_config("reference", hidden_dim=args.hidden_dim, batch_size=args.batch_size,
                            diffusion_steps=args.diffusion_steps, device=device.type).validate()
        learner = QSMLearner(learner_config(cfg), info.obs_dim, info.act_dim, device)
        g = torch.Generator(device=device).manual_seed(0)
        B = cfg.batch_size
        batch = {
            "obs": torch.randn(B, info.obs_dim, device=device, generator=g),
            "action": torch.rand(B, info.act_dim, device=device, generator=g) * 2 - 1,
            "reward": torch.rand(B, device=device, generator=g),
            "next_obs": torch.randn(B, info.obs_dim, device=device, generator=g),
            "mask": torch.ones(B, device=device),
        }
        updates = rate(lambda: learner.update(batch), device, args.updates, args.repeats)
        gemms = update_gemms(B, cfg.hidden_dim, info.obs_dim, info.act_dim, cfg.diffusion_steps, cfg.time_dim, device)
        flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in gemms)
        ceiling = rate(lambda: [a @ b for a, b in gemms], device, args.updates, args.repeats)
        name = f"cpu ({args.threads} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
        rows.append({
            "device": name, "task": args.task, "hidden_dim": cfg.hidden_dim, "batch": B, "T": cfg.diffusion_steps,
            "updates_per_s": round(statistics.median(updates), 1),
            "gemm_ceiling_updates_per_s": round(statistics.median(ceiling), 1),
            "fraction_of_ceiling": round(statistics.median(updates) / statistics.median(ceiling), 2),
            "gflop_per_update": round(flops / 1e9, 2),
            "gemm_gflop_per_s": round(flops * statistics.median(ceiling) / 1e9, 1),
        })

    print_table(rows)
    if args.loop_steps:
        print()
        print_table([loop_throughput(args.task, args.loop_preset, args.loop_steps, args.threads)])
    stem = OUT / f"throughput_{args.task}_h{args.hidden_dim}_{time.strftime('%Y%m%d-%H%M%S')}"
    write_csv(stem.with_suffix(".csv"), rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["updates_per_s"] for r in rows], 0.4, label="QSM update")
    ax.bar([i + 0.2 for i in x], [r["gemm_ceiling_updates_per_s"] for r in rows], 0.4, label="its GEMMs alone")
    ax.set_xticks(list(x), [r["device"] for r in rows])
    ax.set_ylabel("updates / s")
    ax.set_title(f"QSM update throughput (H={args.hidden_dim}, B={args.batch_size}, T={args.diffusion_steps})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"))
    print(f"wrote {stem}.csv and {stem}.png")


if __name__ == "__main__":
    main()
