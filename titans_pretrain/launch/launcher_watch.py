"""Ranks started by `--nproc` die with their launcher instead of training on as orphans.

A launcher that is killed outright (SIGKILL, the OOM killer) cannot forward anything, and its
ranks would keep training into the run folder that a restarted job then finds locked. So the
launcher names itself in the ranks' environment; each rank asks the kernel for SIGKILL when its
parent dies (Linux `prctl(PR_SET_PDEATHSIG)`; the launcher starts ranks from its only thread, the
one the kernel watches), and elsewhere polls its parent pid once a second. A launcher that is
only asked to stop (SIGTERM/SIGUSR1/SIGINT) forwards the signal and its ranks save first.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

LAUNCHER_PID_ENV = "TITANS_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _set_parent_death_signal() -> bool:
    """True when the kernel will SIGKILL this process as its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _poll_parent(launcher: int, interval_s: float) -> None:
    while True:
        if os.getppid() != launcher:
            _die()
        time.sleep(interval_s)


def die_with_launcher(interval_s: float = 1.0) -> None:
    """Called first by every rank; a no-op unless an `--nproc` launcher started this process."""
    value = os.environ.pop(LAUNCHER_PID_ENV, None)  # popped: children of a rank are not ranks
    if value is None:
        return
    launcher = int(value)
    if not _set_parent_death_signal():
        threading.Thread(target=_poll_parent, args=(launcher, interval_s), daemon=True,
                         name="launcher-watch").start()
    if os.getppid() != launcher:  # the launcher died before the death signal was armed
        _die()
