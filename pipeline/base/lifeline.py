"""Processes that die with their parent, and the identity of a process across time (docs/reliability.md).

A SIGKILLed `harvest` runs no cleanup, so what it started must end by itself: `die_with_parent` (the
initializer of decode workers, the preexec of servers) asks Linux to SIGKILL the child when its parent dies
(PR_SET_PDEATHSIG), and elsewhere starts a thread that exits the child once its parent pid changes.
`Owner` names a process by host, pid and start time, so that a recycled pid is never taken for the owner.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Make this process die when its parent does. `parent_pid`: the expected parent (default: the current
    one); if it is already gone (the child started after its parent died), exit now."""
    parent_pid = parent_pid or os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
        except (AttributeError, OSError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="die-with-parent", daemon=True).start()


def _watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)


def process_started(pid: int) -> float | None:
    """Start time of process `pid` (seconds since the epoch), None when there is no such process (or a zombie)."""
    try:
        import psutil   # a dependency of distributed
    except ImportError:   # a bare host (the GPU kit has no psutil): Linux's /proc, psutil's own formula
        return proc_started(pid)
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return float("nan")   # alive, start unknown


def proc_started(pid: int) -> float | None:
    """`process_started` from /proc: boot time + the start time in clock ticks (field 22 of /proc/PID/stat)."""
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration):
        return float("nan")   # no /proc to read: alive or not, start unknown
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2:].split()   # after the command name, which may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: float | None

    @classmethod
    def me(cls) -> "Owner":
        return cls(socket.gethostname(), os.getpid(), process_started(os.getpid()))

    def is_dead(self) -> bool:
        """True only when this host can tell: the pid is gone, or now names a process started at another time."""
        if self.host != socket.gethostname():
            return False
        now = process_started(self.pid)
        if now is None:
            return True
        if self.started is None or now != now:   # start unknown (recorded or now): the pid alone says alive
            return False
        return abs(now - self.started) > 1.0
