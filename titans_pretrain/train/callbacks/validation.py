"""Validation loss every `train.val_interval` steps and at the end."""
from __future__ import annotations

import itertools

from titans_pretrain.config import RunConfig
from titans_pretrain.train.callbacks.base import Callback
from titans_pretrain.train.data import make_loader, val_problem


class Validation(Callback):
    def __init__(self, cfg: RunConfig, manifest, dims):
        self.cfg, self.manifest, self.dims = cfg, manifest, dims
        self.warned = False

    def after_step(self, trainer, result, batch) -> None:
        interval, step = self.cfg.train.val_interval, trainer.progress.step
        if interval and step % interval == 0 and step < trainer.steps:
            self.run(trainer)

    def on_end(self, trainer) -> None:
        self.run(trainer)

    def run(self, trainer) -> float | None:
        if "val" not in self.manifest.splits or self.cfg.train.val_batches == 0:
            return None
        problem = val_problem(self.manifest, self.cfg.train.micro_batch_size * self.dims.dp_size)
        if problem:
            if not self.warned:
                trainer.log(f"[val] skipped: {problem}; prepare more data")
                self.warned = True
            return None
        val = make_loader(self.manifest, self.cfg, "val", self.dims.dp_rank, self.dims.dp_size)
        loss = trainer.engine.evaluate(itertools.islice(iter(val), self.cfg.train.val_batches))
        trainer.record({"step": trainer.progress.step, "val_loss": loss})
        return loss
