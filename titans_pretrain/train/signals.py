"""Stop signals: SIGTERM / SIGUSR1 (schedulers) and SIGINT (Ctrl-C) ask the job to stop; all ranks
agree at a step boundary, save a checkpoint and exit with `EXIT_PREEMPTED`.

The handler only sets a flag (nothing unsafe happens inside a signal handler). At every step
boundary the ranks all-reduce the flag with MAX, so a signal delivered to any one rank (Slurm often
signals only some) stops all of them at the same step, and no rank is left waiting in a collective.

A second Ctrl-C does not abort: the flag is idempotent, because under `--nproc` a rank receives a
terminal's Ctrl-C twice (directly, as a member of the terminal's process group, and forwarded by
the launcher), and the second copy must not turn a save into an abort. To abort without saving,
send SIGQUIT (Ctrl-\\) or SIGKILL. A Ctrl-C before training starts (data preparation, model build)
is not held: there is nothing to save yet, so it interrupts at once.
"""
from __future__ import annotations

import signal

# Exit status after a signal-triggered save. 75 is EX_TEMPFAIL ("try again later"): the job did
# nothing wrong and should be requeued; the Slurm launcher requeues on exactly this code.
EXIT_PREEMPTED = 75
# Exit status when training aborts on repeated non-finite losses/gradients.
EXIT_DIVERGED = 3

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# The scheduler's signals, held from start-up on by `catch_early` (SIGINT is not: see above).
EARLY_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# The last stop signal this process received (None: none yet). The Slurm launcher reads it after
# `train` returns EXIT_PREEMPTED: SIGUSR1 is the time-limit warning (the job requeues itself),
# SIGTERM is preemption, `scontrol requeue` or `scancel` (Slurm decides what follows).
last_received: int | None = None
# A stop signal caught by `catch_early` before the trainer's StopRequest existed; the next
# StopRequest starts out stopped with it.
_early: int | None = None


def catch_early(signals=EARLY_SIGNALS) -> None:
    """Record stop signals from now until a StopRequest takes over. For launchers: Slurm may send
    the time-limit or preemption signal while the ranks still import torch, and SIGUSR1's default
    action would kill the process before any checkpoint; this way the trainer stops (and saves) at
    its first step boundary instead."""
    def handle(signum, frame):
        global _early, last_received
        _early = last_received = signum

    for sig in signals:
        signal.signal(sig, handle)


def ignore_stops(signals=STOP_SIGNALS) -> None:
    """After training returned: nothing is left to save, so stop signals are ignored. Ignored, not
    handled, because Python resets its handlers to the default (die) while it shuts down, and a
    Slurm time-limit USR1 arriving then would turn a finished job into a FAILED one."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """Installs the handlers on construction; `should_stop()` is collective."""

    def __init__(self, signals=STOP_SIGNALS):
        global _early
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.received is None and _early is not None:
            self.received = _early  # a signal `catch_early` held for us
        _early = None

    def _handle(self, signum, frame) -> None:
        global last_received
        self.received = last_received = signum

    def should_stop(self, device: torch.device) -> bool:
        import torch  # here, not at the top: `catch_early` must be usable before torch is imported
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
