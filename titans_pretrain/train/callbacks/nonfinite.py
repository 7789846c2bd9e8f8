"""Non-finite steps: the engine skipped the update; this says where the step went non-finite and
stops the run after `train.max_bad_steps` of them in a row."""
from __future__ import annotations

from titans_pretrain.train.callbacks.base import Callback
from titans_pretrain.train.memory_monitor import MemoryMonitors


class TrainingDiverged(RuntimeError):
    """Raised after `train.max_bad_steps` non-finite steps in a row."""


class NonFiniteGuard(Callback):
    def __init__(self, max_bad_steps: int, n_layers: int):
        self.max_bad_steps, self.n_layers = max_bad_steps, n_layers

    def on_start(self, trainer) -> None:
        self.memory = MemoryMonitors(trainer.engine.module, self.n_layers, trainer.device)

    def after_step(self, trainer, result, batch) -> None:
        if result.finite:
            return
        p = trainer.progress
        trainer.log(f"[train] step {p.step}: non-finite loss {result.loss} or gradient norm "
                    f"{result.grad_norm}; update skipped ({p.bad_in_a_row} in a row, {p.skipped} total); "
                    f"{self.locate(trainer, batch)}")
        if p.bad_in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{p.bad_in_a_row} non-finite steps in a row (train.max_bad_steps={self.max_bad_steps}) at "
                f"step {p.step}: lower optim.lr, check the data, or resume from an earlier checkpoint")

    def locate(self, trainer, batch: list[dict]) -> str:
        """Run the step's micro-batches forward again with locating monitors: where did it start?"""
        with self.memory.attached(locate=True):
            trainer.engine.evaluate(batch)
        return self.memory.nonfinite_report()
