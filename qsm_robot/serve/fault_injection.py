"""Fault injection for tests and campaigns (``qsm-serve run --inject-spike-every N --inject-spike-ms X``):
wrappers around the production parts, which carry no fault branches themselves."""

from __future__ import annotations

import time


class SpikyRunner:
    """A PolicyRunner that stalls every ``every``-th policy call for ``spike_ms`` before onnxruntime
    starts, inside the budgeted section (the budget watchdog is already armed), as a slow host
    would: the watchdog then aborts the run and the node sends its fallback.

    Everything else is the wrapped runner's (``contract``, ``last_run_us``, ``close``, ...).
    ``stalled`` says whether the last call carried a stall (the node flags that tick
    ``TickFlag.INJECTED_STALL``); ``spikes`` counts the stalls."""

    def __init__(self, runner, every: int, spike_ms: float):
        if every < 0 or spike_ms < 0:
            raise ValueError(f"spike_every and spike_ms must be >= 0, got {every} and {spike_ms}")
        self.runner, self.every, self.spike_s = runner, every, spike_ms / 1e3
        self.calls = self.spikes = 0
        self.stalled = False
        self._session_run = runner.session.run
        runner.session.run = self._stalling_run  # called by runner.run once the budget's watchdog is armed

    def _stalling_run(self, *args, **kwargs):
        self.calls += 1
        self.stalled = bool(self.every) and self.calls % self.every == 0
        if self.stalled:
            self.spikes += 1
            time.sleep(self.spike_s)  # injected stall: the watchdog terminates the run that follows
        return self._session_run(*args, **kwargs)

    def run(self, obs, budget_s: float):
        self.stalled = False
        return self.runner.run(obs, budget_s)

    def __getattr__(self, name):
        return getattr(self.runner, name)
