"""Telemetry of the serving node: a per-tick flight recorder, the live status line and the
summary at exit. numpy only; the latency histogram PNG needs matplotlib and is skipped (with a
note) on a robot computer without it: ``qsm-serve plot FILE.npz`` draws it anywhere later."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FLAG_NAMES = ("state_invalid", "obs_out_of_range", "action_invalid", "bounds_clamped", "rate_clamped",
              "fallback", "miss", "stale")
MISS_BIT, STALE_BIT = 1 << 6, 1 << 7


class FlightRecorder:
    """One row per answered state; grows in chunks, saved as .npz."""

    def __init__(self, obs_dim: int, act_dim: int, chunk: int = 65536):
        self.obs_dim, self.act_dim, self.chunk, self.n = obs_dim, act_dim, chunk, 0
        self.dtype = np.dtype([
            ("t_recv_ns", "i8"), ("t_send_ns", "i8"), ("state_seq", "u8"), ("state_t_ns", "i8"),
            ("policy_us", "f4"), ("node_state", "u1"), ("flags", "u2"),
            ("command", "f4", (act_dim,)), ("obs", "f4", (obs_dim,)),
        ])
        self.rows = np.zeros(chunk, self.dtype)

    def add(self, t_recv_ns, t_send_ns, state_seq, state_t_ns, policy_us, node_state, flags, command, obs) -> None:
        if self.n == len(self.rows):
            self.rows = np.concatenate([self.rows, np.zeros(self.chunk, self.dtype)])
        r = self.rows[self.n]
        r["t_recv_ns"], r["t_send_ns"], r["state_seq"], r["state_t_ns"] = t_recv_ns, t_send_ns, state_seq, state_t_ns
        r["policy_us"], r["node_state"], r["flags"] = policy_us, node_state, flags
        r["command"] = command
        if obs is not None and obs.shape == (self.obs_dim,):
            r["obs"] = obs
        self.n += 1

    @property
    def data(self) -> np.ndarray:
        return self.rows[: self.n]

    def save(self, path: Path, **meta) -> Path:
        np.savez_compressed(path, ticks=self.data, flag_names=np.array(FLAG_NAMES), **{k: np.asarray(v) for k, v in meta.items()})
        return path


def percentiles(values: np.ndarray, qs=(50, 99, 99.9)) -> dict[str, float]:
    if len(values) == 0:
        return {f"p{q}": float("nan") for q in qs} | {"max": float("nan")}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs} | {"max": float(np.max(values))}


def plot_histogram(npz_path: Path, png_path: Path | None = None) -> Path | None:
    """Latency histogram of a flight record; None if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ticks = np.load(npz_path)["ticks"]
    node_us = (ticks["t_send_ns"] - ticks["t_recv_ns"]) / 1e3
    policy_us = ticks["policy_us"][np.isfinite(ticks["policy_us"])]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    bins = np.logspace(np.log10(max(1.0, min(node_us.min(initial=1), policy_us.min(initial=1)))),
                       np.log10(max(node_us.max(initial=10), policy_us.max(initial=10)) * 1.1), 80)
    ax.hist(node_us, bins=bins, alpha=0.6, label="state received -> command sent")
    if len(policy_us):
        ax.hist(policy_us, bins=bins, alpha=0.6, label="policy (onnxruntime)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("microseconds")
    ax.set_ylabel("ticks")
    ax.set_title(f"qsm-serve latency, {len(ticks)} ticks")
    ax.legend()
    fig.tight_layout()
    png_path = png_path or Path(npz_path).with_suffix(".png")
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
