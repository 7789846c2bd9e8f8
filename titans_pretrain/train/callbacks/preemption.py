"""Stopping early at a step boundary: a stop signal (SIGTERM/SIGUSR1 from Slurm before a time
limit or preemption, SIGINT) exits with `EXIT_PREEMPTED` for a requeue; `train.stop_at` exits 0.
The checkpointing callback saves in `on_stop`."""
from __future__ import annotations

from titans_pretrain.train.callbacks.base import Callback
from titans_pretrain.train.signals import EXIT_PREEMPTED, StopRequest


class Preemption(Callback):
    def __init__(self, stop_at: int):
        self.stop_at = stop_at
        self.signals: StopRequest | None = None

    def on_start(self, trainer) -> None:
        self.signals = StopRequest()  # takes over what `signals.catch_early` held

    def before_step(self, trainer) -> int | None:
        step = trainer.progress.step
        if self.stop_at and step >= self.stop_at:
            trainer.log(f"[train] train.stop_at={self.stop_at} reached at step {step}: exiting "
                        "(run again without it to continue)")
            return 0
        if self.signals.should_stop(trainer.device):  # collective: every rank stops at the same step
            trainer.log(f"[train] stop signal received at step {step}: exiting with code {EXIT_PREEMPTED} "
                        "(requeue to resume)")
            return EXIT_PREEMPTED
        return None

    def close(self, trainer) -> None:
        if self.signals is not None:
            self.signals.restore()
