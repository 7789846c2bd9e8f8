"""One training job per run folder: rank 0 holds an exclusive lock on `run_dir/.lock`.

Two jobs in one run folder would interleave `metrics.jsonl` and prune each other's checkpoints,
so a second job is refused before it writes anything. The lock is `fcntl.flock` on a descriptor
held open for the life of the process: the kernel drops it when the process ends, however it ends,
so a lock left by a killed job never blocks the next one (it is taken over, and the take-over is
logged). The file's JSON (pid, host, start time) only feeds the messages. An orderly release
empties the file, so a non-empty file found unlocked names a holder that died without releasing.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The run folder is locked by another live process, or cannot be locked at all."""


def _describe(holder: dict) -> str:
    since = holder.get("start_time")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "an unknown time"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}"


class RunLock:
    """`acquire()` takes the lock or raises `RunLockError`; `release()` (or process exit) frees it."""

    def __init__(self, run_dir: str | Path, log=print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.log = log
        self.fd: int | None = None

    def _read_holder(self) -> dict:
        try:
            return json.loads(os.pread(self.fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}  # being written right now, or not ours

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no truncation: it may be held
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._read_holder()
            os.close(self.fd)
            self.fd = None
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunLockError(f"cannot lock {self.path} ({exc.strerror}): this file system refuses "
                                  "flock, so a second job could write into the same run_dir; put run_dir "
                                  "on a file system with locks (local disk, NFSv4, Lustre with -o flock)"
                                  ) from exc
            who = _describe(holder) if holder else "another process (starting up)"
            raise RunLockError(f"run_dir {self.run_dir} is in use by {who}; wait for it or pick another "
                              "run_dir; if that process is gone, the lock is stale and is taken over "
                              "automatically") from None
        stale = self._read_holder()
        if stale:
            self.log(f"[run] taking over the stale lock {self.path} of {_describe(stale)} "
                     "(it ended without releasing it)")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(record) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty file: released in order, not stale
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __del__(self):
        self.release()
