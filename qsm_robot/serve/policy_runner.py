"""The ONNX policy with a hard latency budget.

The policy runs inline on the calling thread (no hand-over to another thread on the hot path,
which costs a wake-up of hundreds of microseconds on an idle core). A watchdog thread, armed
for each call, sets onnxruntime's ``RunOptions.terminate`` when the budget runs out; the run then
aborts and the caller gets None and sends its fallback command.

Fault injection (tests, campaigns) wraps this runner: ``serve/fault_injection.py``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qsm_robot.export.contract import ModelContract
from qsm_robot.export.runtime import make_session, read_contract


class PolicyRunner:
    def __init__(self, model: str | Path, seed: int = 0, warmup: int = 200):
        self.session = make_session(model)
        self.contract: ModelContract = read_contract(self.session)
        self.noise_shape = (1, self.contract.teacher_steps, self.contract.io.act_dim)
        self.rng = np.random.default_rng(seed)
        self.last_run_us = float("nan")
        self._options = ort.RunOptions()
        self._cv = threading.Condition()
        self._deadline_ns: int | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._watchdog, name="policy-watchdog", daemon=True)
        self._thread.start()
        obs = np.zeros((1, self.contract.io.obs_dim), np.float32)
        for _ in range(warmup):  # warm caches and allocators before the node can be armed
            self.session.run(None, {"obs": obs, "noise": self.rng.standard_normal(self.noise_shape, dtype=np.float32)})
        self.rng = np.random.default_rng(seed)  # warm-up draws do not shift the noise stream

    def _watchdog(self) -> None:
        with self._cv:
            while not self._stop:
                if self._deadline_ns is None:
                    self._cv.wait()
                    continue
                left = self._deadline_ns - time.monotonic_ns()
                if left > 0:
                    self._cv.wait(left / 1e9)
                elif self._deadline_ns is not None:
                    self._options.terminate = True  # abort the run in progress
                    self._deadline_ns = None

    def run(self, obs: np.ndarray, budget_s: float) -> np.ndarray | None:
        """One action for obs [obs_dim], or None if the budget ran out (or the model failed)."""
        noise = self.rng.standard_normal(self.noise_shape, dtype=np.float32)
        if budget_s <= 0:
            return None
        t = time.perf_counter_ns()
        with self._cv:
            self._deadline_ns = time.monotonic_ns() + int(budget_s * 1e9)
            self._cv.notify()
        try:
            action = self.session.run(None, {"obs": obs.reshape(1, -1).astype(np.float32), "noise": noise}, self._options)[0][0]
        except Exception:  # terminated at the budget, or a failing model: the caller falls back
            action = None
        finally:
            with self._cv:
                self._deadline_ns = None
                self._options.terminate = False
        self.last_run_us = (time.perf_counter_ns() - t) / 1e3
        return action

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=1.0)
