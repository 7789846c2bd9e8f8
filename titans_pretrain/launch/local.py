"""`train --nproc N`: this process becomes a small launcher of N local ranks.

Each rank is a fresh `python -m titans_pretrain train ...` with the rendezvous environment
(`MASTER_ADDR`/`MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`) that `torchrun` would give it. The
launcher forwards SIGTERM/SIGUSR1/SIGINT to the ranks, stops the rest when one fails, and returns
their exit code; the ranks die with it if it is killed outright (`launcher_watch`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def launch_local(nproc: int, argv: list[str], grace_s: float = 30.0) -> int:
    """Run `python -m titans_pretrain train <argv>` as `nproc` ranks on this machine."""
    from titans_pretrain.distributed.mesh import free_port
    from titans_pretrain.launch.launcher_watch import LAUNCHER_PID_ENV

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # the ranks die with this process (launcher_watch)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = []
    for rank in range(nproc):
        procs.append(subprocess.Popen([sys.executable, "-m", "titans_pretrain", "train", *argv],
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            bad = [p for p in procs if p.poll() not in (None, 0)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:  # a rank died and the others are stuck in a collective
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    codes = [p.returncode for p in procs]
    nonzero = [c for c in codes if c != 0]
    return nonzero[0] if nonzero else 0
