"""A run's metrics on disk: CSV files, TensorBoard events and the learning-curve PNG.

    train.csv     every log_every steps: throughput, losses, mean Q, actor learning rate
    episodes.csv  every finished training episode: return and length
    eval.csv      every evaluation: mean, std, min and max return over the eval episodes
    tb/           the same series as TensorBoard events
    learning_curve.png  eval return (and training episode returns) vs frames

The CSV files count ``step`` in policy steps (actions), as ``--steps`` does. The plot's axis is in
**frames**: the task's own control steps, policy steps x ``action_repeat`` (read from the run's
config.json), the unit the literature reports and ``qsm-sweep report`` uses.

On resume, rows past the checkpoint's step (written after it, then lost to a kill) are dropped,
and TensorBoard is told to purge events past that step, so the logs read as one run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from qsm_robot.files import atomic_write

TRAIN_COLUMNS = ["step", "time_s", "steps_per_s", "updates_per_s", "critic_loss", "actor_loss", "q_mean", "q_grad_rms", "actor_lr"]
EPISODE_COLUMNS = ["step", "time_s", "return", "length"]
EVAL_COLUMNS = ["step", "time_s", "return_mean", "return_std", "return_min", "return_max", "episodes", "saturated"]
"""``saturated``: the share of the evaluation's action components at a bound (|a| >= 0.99 in [-1, 1]):
a QSM policy with a large M_q acts bang-bang, which costs reward on tasks that penalise control."""


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def action_repeat_of(run_dir: Path) -> int:
    """The run's action repeat from its config.json (1 when it has none): frames per policy step."""
    try:
        return int(json.loads((run_dir / "config.json").read_text()).get("action_repeat", 1))
    except (OSError, ValueError):
        return 1


class RunLog:
    """Appends rows to the run's CSV files and TensorBoard, and redraws the plot."""

    def __init__(self, run_dir: Path, title: str, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.title = run_dir, title
        self.files = {
            "train": (run_dir / "train.csv", TRAIN_COLUMNS),
            "episodes": (run_dir / "episodes.csv", EPISODE_COLUMNS),
            "eval": (run_dir / "eval.csv", EVAL_COLUMNS),
        }
        for path, columns in self.files.values():
            rows = read_csv(path)
            if resume_step is not None:
                rows = [r for r in rows if int(r["step"]) <= resume_step]
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)

    def _append(self, name: str, row: dict) -> None:
        path, columns = self.files[name]
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=columns).writerow(row)
        for key, value in row.items():
            if key not in ("step", "time_s") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{name}/{key}", value, row["step"])

    def train(self, **row) -> None:
        self._append("train", row)

    def episode(self, **row) -> None:
        self._append("episodes", row)

    def eval(self, **row) -> None:
        self._append("eval", row)
        self.tb.flush()
        self.plot()

    def plot(self) -> Path:
        """Redraw learning_curve.png (written atomically) and return its path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        evals, episodes = read_csv(self.files["eval"][0]), read_csv(self.files["episodes"][0])
        repeat = action_repeat_of(self.run_dir)  # x axis in frames = policy steps x action repeat
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if episodes:
            ax.plot([int(r["step"]) * repeat for r in episodes], [float(r["return"]) for r in episodes],
                    ".", color="tab:gray", alpha=0.5, label="train episode return")
        if evals:
            steps = [int(r["step"]) * repeat for r in evals]
            mean = [float(r["return_mean"]) for r in evals]
            std = [float(r["return_std"]) for r in evals]
            ax.plot(steps, mean, "-o", color="tab:blue", label="eval return (mean)")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color="tab:blue", alpha=0.2, label="eval return (std)")
        ax.set_xlabel(f"frames (policy steps x action repeat {repeat})")
        ax.set_ylabel("return")
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        fig.tight_layout()
        path = atomic_write(self.run_dir / "learning_curve.png", fig.savefig)
        plt.close(fig)
        return path

    def close(self) -> None:
        self.tb.close()
