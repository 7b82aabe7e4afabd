"""onnxruntime sessions tuned for batch-1 latency, and the contract they carry (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from qsm_robot.export.contract import ModelContract


def make_session(model: str | Path | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session for one small model called at batch 1: one intra-op thread, sequential
    execution, every graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def read_contract(session: ort.InferenceSession) -> ModelContract:
    """The model's contract (its I/O description and sampler facts); ContractError if it has none
    or one of another version."""
    return ModelContract.from_metadata(session.get_modelmeta().custom_metadata_map)


def latency_us(session: ort.InferenceSession, obs_dim: int, noise_shape: tuple, calls: int, warmup: int = 200) -> np.ndarray:
    """Wall time of ``calls`` batch-1 runs (microseconds), after ``warmup`` runs."""
    rng = np.random.default_rng(0)
    feeds = {"obs": rng.standard_normal((1, obs_dim), dtype=np.float32),
             "noise": rng.standard_normal((1, *noise_shape), dtype=np.float32)}
    import time

    for _ in range(warmup):
        session.run(None, feeds)
    times = np.empty(calls)
    for i in range(calls):
        t = time.perf_counter_ns()
        session.run(None, feeds)
        times[i] = time.perf_counter_ns() - t
    return times / 1e3
