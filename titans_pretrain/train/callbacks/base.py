"""The callback contract: everything in training that is not the step itself.

The trainer calls each hook on every callback in list order (`close` in reverse). Every hook is
optional; a callback overrides the ones it needs.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager

if TYPE_CHECKING:
    from titans_pretrain.train.engines.base import StepResult
    from titans_pretrain.train.trainer import Trainer


class Callback:
    def on_start(self, trainer: Trainer) -> None:
        """Before the first step (a callback before this one may have resumed the counters)."""

    def before_step(self, trainer: Trainer) -> int | None:
        """An exit code stops the run before this step; every callback's `on_stop` then runs."""
        return None

    def step_context(self, trainer: Trainer) -> ContextManager:
        """Entered around the engine's step alone (monitors, timers, the profiler's scope)."""
        return contextlib.nullcontext()

    def after_step(self, trainer: Trainer, result: StepResult, batch: list[dict]) -> None:
        """After the step; `trainer.progress` already counts it."""

    def on_metrics(self, trainer: Trainer, metrics: dict) -> None:
        """A metrics record, from any callback (`trainer.record`)."""

    def on_stop(self, trainer: Trainer, code: int) -> None:
        """The run stops before `train.steps` with `code` (a stop signal, `train.stop_at`)."""

    def on_end(self, trainer: Trainer) -> None:
        """All steps done."""

    def close(self, trainer: Trainer) -> None:
        """Last, always, also after an error: no collectives (the other ranks may be gone)."""
