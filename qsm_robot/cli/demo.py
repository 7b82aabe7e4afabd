"""``qsm-demo``: the whole stack on a default task: train -> export -> serve against the robot node.

    qsm-demo                       # cartpole-swingup, fast preset, 30k steps (about 8 min on 2 CPU cores)
    qsm-demo --steps 5000 --preset smoke --robot-episodes 1   # a 1-minute look

1. qsm-train trains a QSM policy (progress bar, eval lines);
2. qsm-export distils it into a 1-step student, writes verified ONNX beside the run;
3. qsm-serve calibrate measures the policy's latency on this host and the closed-loop envelope,
   and writes the calibration record the serving node requires;
4. qsm-serve (the ONNX policy, numpy/pyzmq/onnxruntime only) and qsm-sim (the simulated robot)
   start as separate processes; the robot runs episodes in real time through the control loop;
5. a summary compares the closed-loop return with the offline evaluation of the same ONNX file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qsm-demo", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--task", default="cartpole-swingup")
    p.add_argument("--preset", default="fast")
    p.add_argument("--steps", type=int, default=30_000)
    p.add_argument("--learning-starts", type=int, default=5_000)
    p.add_argument("--robot-episodes", type=int, default=2)
    p.add_argument("--out", type=Path, help="demo folder (default runs/demo-<time>)")
    a = p.parse_args(argv)
    out = a.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists():
        print(f"qsm-demo: error: {out} exists; choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True)

    from qsm_robot.cli.export import main as export_main
    from qsm_robot.cli.train import main as train_main

    print(f"\n== 1/4 qsm-train: {a.task}, preset {a.preset}, {a.steps} steps ==", flush=True)
    rc = train_main(["--task", a.task, "--preset", a.preset, "--steps", str(a.steps), "--learning-starts",
                     str(min(a.learning_starts, a.steps // 2)), "--eval-every", str(max(1, a.steps // 6)),
                     "--eval-episodes", "5", "--run-dir", str(out / "train")])
    if rc != 0:
        return rc
    print("\n== 2/4 qsm-export: 1-step student -> ONNX ==", flush=True)
    model = out / "policy.onnx"
    rc = export_main([str(out / "train"), "--out", str(model)])
    if rc != 0:
        print("qsm-demo: the export did not pass its gates; the report above says which (a longer --steps helps)",
              file=sys.stderr)
        return rc

    from qsm_robot.envs import make_env
    from qsm_robot.export.runtime import make_session, read_contract

    session = make_session(model)
    c = read_contract(session)
    episode_steps = -(-1000 // c.action_repeat)  # a dm_control episode, in policy steps
    profile = {
        "name": "demo", "task": c.task, "obs_dim": c.obs_dim, "act_dim": c.act_dim, "action_low": c.action_low,
        "action_high": c.action_high, "safe_command": [(lo + hi) / 2 for lo, hi in zip(c.action_low, c.action_high)],
        "rate_hz": 1.0 / c.control_period_s, "latency_budget_ms": 0.5e3 * c.control_period_s, "max_delta_per_tick": None,
        "endpoints": {k: f"ipc://{out.resolve()}/{k}.sock" for k in ("state", "command", "control")},
        "robot": {"watchdog_periods": 5, "episode_steps": episode_steps},
    }
    (out / "profile.json").write_text(json.dumps(profile, indent=2))
    (out / "scenario.json").write_text(json.dumps({"name": "demo", "seed": 3, "episodes": a.robot_episodes}))
    print("\n== 3/4 qsm-serve calibrate: latency on this host, envelope from 1 closed-loop episode ==", flush=True)
    from qsm_robot.cli.serve import main as serve_main

    calibration = out / "calib" / "demo.json"
    rc = serve_main(["calibrate", "--model", str(model), "--profile", str(out / "profile.json"), "--name", "demo",
                     "--out", str(calibration), "--latency-calls", "500", "--episodes", "1"])
    if rc != 0:
        return rc
    print(f"\n== 4/4 qsm-serve + qsm-sim: {a.robot_episodes} episode(s) of {episode_steps} steps in real time "
          f"at {profile['rate_hz']:g} Hz ==", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    serve = subprocess.Popen([sys.executable, "-m", "qsm_robot.cli.serve", "run", "--model", str(model), "--profile",
                              str(out / "profile.json"), "--calibration", str(calibration), "--arm",
                              "--record-dir", str(out / "serve")],
                             env=env, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # model load and warm-up
        sim = subprocess.run([sys.executable, "-m", "qsm_robot.robot.node", "--profile", str(out / "profile.json"),
                              "--scenario", str(out / "scenario.json"), "--results", str(out / "robot.json")], env=env)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve_out, _ = serve.communicate(timeout=60)
    print(serve_out)
    if sim.returncode != 0:
        return sim.returncode
    robot = json.loads((out / "robot.json").read_text())

    # Offline: the same ONNX file, the same env seed and noise stream, no network in between.
    rng, offline = np.random.default_rng(0), []
    envs = make_env(c.task, seed=3, action_repeat=c.action_repeat, rescale_actions=False)
    for _ in range(a.robot_episodes):
        obs, total = envs.reset()[0], 0.0
        for _ in range(episode_steps):
            noise = rng.standard_normal((1, *c.noise_shape[1:]), dtype=np.float32)
            obs, r, term, trunc, _ = envs.step(session.run(None, {"obs": obs[None], "noise": noise})[0][0])
            total += r
            if term or trunc:
                break
        offline.append(total)
    lat = robot["latency_us"]
    rows = [
        ("policy", f"{out / 'train'} -> {model}"),
        ("closed-loop returns", [round(r, 1) for r in robot["episodes"]]),
        ("offline returns (same ONNX, seeds, noise)", [round(r, 1) for r in offline]),
        ("robot: rate", f"{robot['achieved_rate_hz']:.1f} Hz"),
        ("robot: state -> command latency", f"p50 {lat['p50']:.0f} us, p99 {lat['p99']:.0f} us, max {lat['max']:.0f} us"),
        ("robot: late commands / watchdog trips", f"{robot['commands_late']} / {robot['watchdog_trips']}"),
        ("calibration record", calibration),
        ("learning curve", out / "train" / "learning_curve.png"),
        ("export report", model.with_suffix(".report.json")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(["== qsm-demo summary =="] + [f"{k:<{width}}  {v}" for k, v in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
