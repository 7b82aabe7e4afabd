"""Real-time settings of a control loop's thread: CPU affinity, SCHED_FIFO, mlockall.

``apply(settings, spin_us)`` is called on the loop's own thread when the loop starts (affinity
and the scheduling policy are per thread on Linux; threads started later inherit them, threads
that already exist, such as ZeroMQ's I/O thread and the policy's budget watchdog, keep theirs).
Each setting is applied when the OS allows it; a refused one comes back with the reason, and
the loop runs on without it: nothing here raises. Standard library only (ctypes for mlockall).

docs/PROTOCOL.md ("Real-time settings") says what each setting does on a robot computer with
isolated cores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import sys
from dataclasses import dataclass

from qsm_robot.serve.profile import RealtimeSettings

OFF, APPLIED, REFUSED = "off", "applied", "refused"
CODES = {OFF: 0, APPLIED: 1, REFUSED: -1}
"""How STATUS carries an outcome (``Status.rt_cpu_affinity``, ``rt_mlockall``)."""
CAP_IPC_LOCK = 14
MASK_CPUS = 53
"""STATUS carries the CPU set as a float64 bit mask: exact for CPUs 0 to 52."""


@dataclass(frozen=True)
class Outcome:
    """One setting: what was asked, what happened, and in words what is in force or why not."""

    setting: str
    requested: object
    state: str
    """'off' (not requested), 'applied' or 'refused'."""
    detail: str

    @property
    def code(self) -> int:
        return CODES[self.state]

    def to_dict(self) -> dict:
        return {"requested": self.requested, "state": self.state, "detail": self.detail}


@dataclass(frozen=True)
class RealtimeReport:
    """What ``apply`` did, for the start-up banner, STATUS and the logs."""

    cpu_affinity: Outcome
    sched_fifo: Outcome
    mlockall: Outcome
    spin_us: float
    cpus: tuple[int, ...]
    """The CPUs the loop thread may run on afterwards (read back from the OS; () when unknown)."""
    fifo_priority: int
    """The SCHED_FIFO priority in force (0: another policy)."""

    @property
    def outcomes(self) -> tuple[Outcome, Outcome, Outcome]:
        return self.cpu_affinity, self.sched_fifo, self.mlockall

    @property
    def cpu_mask(self) -> int:
        """The CPU set as a bit mask (bit i: CPU i), CPUs 0-52 only (STATUS's float64)."""
        return sum(1 << c for c in self.cpus if c < MASK_CPUS)

    def warnings(self) -> list[str]:
        """One line per refused setting."""
        return [f"WARNING: real-time setting {o.setting} ({o.requested}) refused: {o.detail}; running on without it"
                for o in self.outcomes if o.state == REFUSED]

    def banner(self) -> str:
        """One line: each setting's state, the CPUs, spinning."""
        parts = []
        for o in self.outcomes:
            parts.append(f"{o.setting} {o.state}" + (f" ({o.detail})" if o.state == APPLIED else ""))
        cpus = ",".join(map(str, self.cpus)) if self.cpus else "?"
        spin = f"spin {self.spin_us:g} us" if self.spin_us else "spin off"
        return f"real-time: {'; '.join(parts)}; loop thread on CPUs {cpus}; {spin}"

    def to_dict(self) -> dict:
        return {"cpu_affinity": self.cpu_affinity.to_dict(), "sched_fifo": self.sched_fifo.to_dict(),
                "mlockall": self.mlockall.to_dict(), "cpus": list(self.cpus), "spin_us": self.spin_us}


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name}: {exc.strerror or exc}" if name else f"{type(exc).__name__}: {exc}"


def current_cpus() -> tuple[int, ...]:
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return ()


def apply_cpu_affinity(cpus: list[int] | None) -> Outcome:
    """Pin the calling thread to ``cpus`` (os.sched_setaffinity)."""
    if cpus is None:
        return Outcome("cpu_affinity", None, OFF, "the OS's choice")
    requested = list(cpus)
    try:
        if not hasattr(os, "sched_setaffinity"):
            return Outcome("cpu_affinity", requested, REFUSED, f"not supported on {sys.platform}")
        os.sched_setaffinity(0, requested)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EINVAL:
            hint = f" (CPUs {requested} are not online or not in this process's cpuset {list(current_cpus())})"
        elif exc.errno == errno.EPERM:
            hint = " (not allowed to change this thread's affinity)"
        return Outcome("cpu_affinity", requested, REFUSED, _errno_text(exc) + hint)
    except Exception as exc:  # never let a setting stop the loop
        return Outcome("cpu_affinity", requested, REFUSED, f"{type(exc).__name__}: {exc}")
    return Outcome("cpu_affinity", requested, APPLIED, f"CPUs {','.join(map(str, current_cpus()))}")


def _rtprio_limit() -> str:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
        return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    except Exception:
        return "unknown"


def apply_sched_fifo(priority: int | None) -> Outcome:
    """Run the calling thread under SCHED_FIFO at ``priority`` (os.sched_setscheduler)."""
    if priority is None:
        return Outcome("sched_fifo", None, OFF, "default scheduler")
    try:
        if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_FIFO"):
            return Outcome("sched_fifo", priority, REFUSED, f"not supported on {sys.platform}")
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError as exc:
        return Outcome("sched_fifo", priority, REFUSED,
                       f"{_errno_text(exc)}: SCHED_FIFO needs CAP_SYS_NICE or an rtprio limit >= {priority} "
                       f"(ulimit -r is {_rtprio_limit()}: raise it in /etc/security/limits.conf, or "
                       "setcap cap_sys_nice+ep); in a container, also an RT runtime budget for its cgroup")
    except OSError as exc:
        return Outcome("sched_fifo", priority, REFUSED, _errno_text(exc))
    except Exception as exc:
        return Outcome("sched_fifo", priority, REFUSED, f"{type(exc).__name__}: {exc}")
    return Outcome("sched_fifo", priority, APPLIED, f"priority {priority}")


def _mcl_flags() -> int:
    """MCL_CURRENT | MCL_FUTURE for this CPU architecture (Linux)."""
    if platform.machine().lower().startswith(("ppc", "powerpc", "sparc")):
        return 0x2000 | 0x4000
    return 1 | 2


def _libc_mlockall(flags: int) -> int:
    """mlockall(flags) through libc: 0, or the errno it failed with."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mlockall(ctypes.c_int(flags)) == 0:
        return 0
    return ctypes.get_errno() or errno.EPERM


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False


def _memlock_limit() -> int | None:
    """RLIMIT_MEMLOCK's soft limit in bytes; None when unlimited (or unknown)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return None if soft == resource.RLIM_INFINITY else soft
    except Exception:
        return None


def apply_mlockall(on: bool) -> Outcome:
    """Lock the whole process in RAM, now and later (mlockall(MCL_CURRENT | MCL_FUTURE)).

    Refused without trying when the memlock limit is finite and the process lacks CAP_IPC_LOCK:
    with MCL_FUTURE, every later allocation past that limit would fail (a crash mid-run), which
    is worse than no lock."""
    if not on:
        return Outcome("mlockall", False, OFF, "pages may be swapped out")
    try:
        if not sys.platform.startswith("linux"):
            return Outcome("mlockall", True, REFUSED, f"not supported on {sys.platform}")
        limit = _memlock_limit()
        if limit is not None and not _has_capability(CAP_IPC_LOCK):
            return Outcome("mlockall", True, REFUSED,
                           f"the memlock limit is {limit // 1024} KiB (ulimit -l) and the process lacks CAP_IPC_LOCK: "
                           "later allocations past it would fail; set memlock unlimited for this user "
                           "(/etc/security/limits.conf, or LimitMEMLOCK=infinity in a systemd unit) or grant "
                           "CAP_IPC_LOCK")
        err = _libc_mlockall(_mcl_flags())
    except Exception as exc:
        return Outcome("mlockall", True, REFUSED, f"{type(exc).__name__}: {exc}")
    if err:
        name = errno.errorcode.get(err, str(err))
        hint = {errno.ENOMEM: " (the process is larger than the memlock limit)",
                errno.EPERM: " (needs CAP_IPC_LOCK)"}.get(err, "")
        return Outcome("mlockall", True, REFUSED, f"{name}: {os.strerror(err)}{hint}")
    return Outcome("mlockall", True, APPLIED, "MCL_CURRENT|MCL_FUTURE")


def apply(settings: RealtimeSettings, spin_us: float = 0.0) -> RealtimeReport:
    """Apply ``settings`` to the calling thread (mlockall: the whole process), in this order:
    mlockall (the process's memory as it is now, buffers included), affinity, then SCHED_FIFO
    (last: everything before it runs under the normal scheduler). Never raises."""
    lock = apply_mlockall(settings.mlockall)
    affinity = apply_cpu_affinity(settings.cpu_affinity)
    fifo = apply_sched_fifo(settings.sched_fifo_priority)
    return RealtimeReport(affinity, fifo, lock, float(spin_us), current_cpus(),
                          settings.sched_fifo_priority if fifo.state == APPLIED else _fifo_priority_in_force())


def _fifo_priority_in_force() -> int:
    """The calling thread's SCHED_FIFO priority when it already runs under it (e.g. started with
    ``chrt -f``), else 0."""
    try:
        return os.sched_getparam(0).sched_priority if os.sched_getscheduler(0) == os.SCHED_FIFO else 0
    except (AttributeError, OSError):
        return 0
