"""Real-time settings (serve/realtime.py): each applied or refused with the reason, never raising;
their validation in profiles; their report in STATUS and in the robot client's report.

The OS calls that would change this test process for good (SCHED_FIFO, mlockall) are replaced
with fakes; affinity is set for real only on a short-lived thread of its own."""

import errno
import os
import re
import threading

import numpy as np
import pytest
from conftest import profile_data

from qsm_robot.serve import realtime
from qsm_robot.serve.profile import Profile, ProfileError, RealtimeSettings


def profile(tmp_path=None, **overrides) -> Profile:
    data = profile_data("rt", require_calibration=False, rate_hz=100, **overrides)
    if tmp_path is not None:
        data["endpoints"] = {k: f"ipc://{tmp_path}/{k}.sock" for k in ("state", "command", "control")}
    return Profile.from_dict(data)


def on_own_thread(fn):
    """fn() on a fresh thread (affinity and the scheduler are per thread): its result."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    t.join()
    return out["r"]


# --- profile -----------------------------------------------------------------------------------
def test_profiles_without_realtime_settings_load_with_everything_off():
    p = profile()
    assert p.realtime == RealtimeSettings() and p.robot.realtime == RealtimeSettings()
    assert (p.realtime.cpu_affinity, p.realtime.sched_fifo_priority, p.realtime.mlockall) == (None, None, False)
    assert Profile.from_dict({**profile_data("rt"), "realtime": None}).realtime == RealtimeSettings()


def test_realtime_settings_round_trip_and_are_not_part_of_the_calibration_basis():
    on = {"cpu_affinity": [2, 3], "sched_fifo_priority": 80, "mlockall": True}
    p = profile(realtime=on, robot={"realtime": {"cpu_affinity": [1]}})
    assert p.realtime == RealtimeSettings([2, 3], 80, True) and p.robot.realtime.cpu_affinity == [1]
    assert Profile.from_dict(p.to_dict()) == p
    assert p.fingerprint() == profile().fingerprint()  # the host's settings, like endpoints: no recalibration


@pytest.mark.parametrize("override,message", [
    ({"realtime": {"cpu_affinity": []}}, "realtime.cpu_affinity: must be null or a non-empty list"),
    ({"realtime": {"cpu_affinity": [1, 1]}}, "realtime.cpu_affinity: must be null or a non-empty list"),
    ({"realtime": {"cpu_affinity": [-1]}}, "realtime.cpu_affinity:"),
    ({"realtime": {"cpu_affinity": 2}}, "realtime.cpu_affinity:"),
    ({"realtime": {"sched_fifo_priority": 0}}, "realtime.sched_fifo_priority: must be null or an integer from 1 to 99, got 0"),
    ({"realtime": {"sched_fifo_priority": 100}}, "realtime.sched_fifo_priority: must be null or an integer from 1 to 99"),
    ({"realtime": {"sched_fifo_priority": 50.5}}, "realtime.sched_fifo_priority:"),
    ({"realtime": {"mlockall": "yes"}}, "realtime.mlockall: must be true or false, got 'yes'"),
    ({"realtime": {"mlock": True}}, "realtime: unknown keys ['mlock']"),
    ({"realtime": [2, 3]}, "realtime: must be an object"),
    ({"robot": {"realtime": {"sched_fifo_priority": -5}}}, "robot.realtime.sched_fifo_priority:"),
])
def test_invalid_realtime_settings_name_the_field(override, message):
    with pytest.raises(ProfileError, match=re.escape(message)):
        profile(**override)


# --- each setting, applied or refused ----------------------------------------------------------
def test_affinity_applied_on_the_calling_thread_only():
    cpus = sorted(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    out = on_own_thread(lambda: realtime.apply_cpu_affinity([cpus[-1]]))
    assert out.state == "applied" and out.detail == f"CPUs {cpus[-1]}"
    assert os.sched_getaffinity(0) == before  # this thread kept its CPUs


def test_affinity_to_a_cpu_that_does_not_exist_is_refused_with_the_reason():
    out = on_own_thread(lambda: realtime.apply_cpu_affinity([4000]))
    assert out.state == "refused" and "EINVAL" in out.detail and "not online" in out.detail


def test_affinity_refused_by_the_os(monkeypatch):
    def deny(pid, cpus):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", deny)
    out = realtime.apply_cpu_affinity([0])
    assert (out.state, out.code) == ("refused", -1) and "EPERM" in out.detail


def test_sched_fifo_applied(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "sched_setscheduler", lambda pid, policy, param: calls.append((pid, policy, param.sched_priority)))
    out = realtime.apply_sched_fifo(80)
    assert out.state == "applied" and calls == [(0, os.SCHED_FIFO, 80)]


def test_sched_fifo_refused_names_the_capability_and_the_limit(monkeypatch):
    def deny(*args):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", deny)
    out = realtime.apply_sched_fifo(80)
    assert out.state == "refused" and "CAP_SYS_NICE" in out.detail and "ulimit -r" in out.detail


@pytest.mark.parametrize("err,words", [(errno.ENOMEM, "memlock limit"), (errno.EPERM, "CAP_IPC_LOCK")])
def test_mlockall_refused_by_the_os(monkeypatch, err, words):
    monkeypatch.setattr(realtime, "_memlock_limit", lambda: None)
    monkeypatch.setattr(realtime, "_libc_mlockall", lambda flags: err)
    out = realtime.apply_mlockall(True)
    assert out.state == "refused" and errno.errorcode[err] in out.detail and words in out.detail


def test_mlockall_applied_with_current_and_future(monkeypatch):
    flags = []
    monkeypatch.setattr(realtime, "_memlock_limit", lambda: None)
    monkeypatch.setattr(realtime, "_libc_mlockall", lambda f: flags.append(f) or 0)
    monkeypatch.setattr(realtime.platform, "machine", lambda: "x86_64")
    assert realtime.apply_mlockall(True).state == "applied" and flags == [1 | 2]


def test_mlockall_is_not_tried_under_a_finite_limit_without_cap_ipc_lock(monkeypatch):
    """With MCL_FUTURE, allocations past the limit would fail later, mid-run: refuse up front."""
    monkeypatch.setattr(realtime, "_memlock_limit", lambda: 8 << 20)
    monkeypatch.setattr(realtime, "_has_capability", lambda bit: False)
    monkeypatch.setattr(realtime, "_libc_mlockall", lambda f: pytest.fail("mlockall was called"))
    out = realtime.apply_mlockall(True)
    assert out.state == "refused" and "8192 KiB" in out.detail and "CAP_IPC_LOCK" in out.detail


def test_off_settings_touch_nothing(monkeypatch):
    for name in ("sched_setaffinity", "sched_setscheduler"):
        monkeypatch.setattr(os, name, lambda *a: pytest.fail(f"{name} called"))
    monkeypatch.setattr(realtime, "_libc_mlockall", lambda f: pytest.fail("mlockall called"))
    rep = realtime.apply(RealtimeSettings(), spin_us=0)
    assert [o.state for o in rep.outcomes] == ["off"] * 3 and rep.warnings() == []
    assert "spin off" in rep.banner() and rep.cpus == tuple(sorted(os.sched_getaffinity(0)))


def refuse_everything(monkeypatch, exc=RuntimeError("boom")):
    def raise_(*args):
        raise exc

    monkeypatch.setattr(os, "sched_setaffinity", raise_)
    monkeypatch.setattr(os, "sched_setscheduler", raise_)
    monkeypatch.setattr(realtime, "_memlock_limit", lambda: None)
    monkeypatch.setattr(realtime, "_libc_mlockall", raise_)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), PermissionError(errno.EPERM, "no"), OSError(errno.EINVAL, "bad")])
def test_apply_never_raises_and_warns_once_per_refused_setting(monkeypatch, exc):
    refuse_everything(monkeypatch, exc)
    rep = realtime.apply(RealtimeSettings([0], 50, True), spin_us=20)
    assert [o.state for o in rep.outcomes] == ["refused"] * 3
    warnings = rep.warnings()
    assert len(warnings) == 3 and all("running on without it" in w for w in warnings)
    assert {"cpu_affinity", "sched_fifo", "mlockall"} == {w.split()[3] for w in warnings}
    assert "spin 20 us" in rep.banner() and rep.fifo_priority in (0, *range(1, 100))


# --- reported: STATUS and the robot's report ---------------------------------------------------
def test_node_reports_refused_settings_in_status_and_runs_on(tmp_path, tiny_model, monkeypatch):
    from qsm_robot.serve.node import ServeNode
    from qsm_robot.serve.status import Status

    refuse_everything(monkeypatch, PermissionError(errno.EPERM, "Operation not permitted"))
    logs = []
    node = ServeNode(tiny_model, profile(tmp_path, spin_us=50.0,
                                         realtime={"cpu_affinity": [0], "sched_fifo_priority": 10, "mlockall": True}),
                     log=logs.append)
    try:
        assert node.core.status().rt_mlockall == 0  # before the loop starts: nothing applied yet
        thread = threading.Thread(target=node.run, kwargs={"duration_s": 0.2})
        thread.start()
        thread.join()
        assert node.core.realtime is not None
        status = Status.decode(node.core.status().encode())
    finally:
        node.close()
    assert (status.rt_cpu_affinity, status.rt_sched_fifo_priority, status.rt_mlockall) == (-1, -1, -1)
    assert status.spin_us == 50.0 and status.rt_cpu_mask == sum(1 << c for c in os.sched_getaffinity(0) if c < 53)
    assert sum("WARNING: real-time setting" in m for m in logs) == 3
    d = status.to_dict()
    assert d["rt_cpu_affinity"] == d["rt_mlockall"] == d["rt_sched_fifo_priority"] == "refused"


def test_node_reports_applied_settings_in_status(tmp_path, tiny_model, monkeypatch):
    from qsm_robot.serve.node import ServeNode

    monkeypatch.setattr(os, "sched_setscheduler", lambda *a: None)
    monkeypatch.setattr(realtime, "_memlock_limit", lambda: None)
    monkeypatch.setattr(realtime, "_libc_mlockall", lambda f: 0)
    cpu = max(os.sched_getaffinity(0))
    node = ServeNode(tiny_model, profile(tmp_path, realtime={"cpu_affinity": [cpu], "sched_fifo_priority": 10,
                                                              "mlockall": True}), log=lambda m: None)
    try:
        on_own_thread(node.apply_realtime)  # as the loop's thread would
        s = node.core.status()
    finally:
        node.close()
    assert (s.rt_cpu_affinity, s.rt_cpu_mask, s.rt_sched_fifo_priority, s.rt_mlockall) == (1, 1 << cpu, 10, 1)
    assert s.to_dict()["rt_cpu_mask"] == [cpu]


def test_robot_client_applies_its_own_settings_and_reports_them(tmp_path, monkeypatch):
    from qsm_robot.robot.client import Robot, RobotClient

    class ThreeTicks(Robot):
        def __init__(self):
            self.n = 0

        def observe(self):
            return np.zeros(5, np.float32)

        def apply(self, command):
            self.n += 1

        def episode_done(self):
            return self.n >= 3

    monkeypatch.setattr(realtime, "_memlock_limit", lambda: None)
    monkeypatch.setattr(realtime, "_libc_mlockall", lambda f: errno.ENOMEM)
    logs = []
    p = profile(tmp_path, robot={"realtime": {"mlockall": True}})
    client = RobotClient(p, ThreeTicks(), log=logs.append)
    try:
        report = client.run(episodes=1, connect_wait_s=0)
    finally:
        client.close()
    assert report.steps == 3
    assert report.realtime["mlockall"]["state"] == "refused" and report.realtime["sched_fifo"]["state"] == "off"
    assert any("WARNING: real-time setting mlockall" in m for m in logs)
