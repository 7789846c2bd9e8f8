"""Metrics: what a step measured (`StepMetrics`) and where records go (`MetricSinks`)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from titans_pretrain.config import RunConfig
from titans_pretrain.models.flops import device_peak_flops, mfu
from titans_pretrain.train.callbacks.base import Callback
from titans_pretrain.train.data import source_tokens
from titans_pretrain.train.loggers import MetricLoggers, Throughput
from titans_pretrain.train.memory_monitor import MemoryMonitors


class StepMetrics(Callback):
    """Every `logging.interval` steps and at the last: loss, lr, gradient norm, tokens/s, MFU,
    skipped steps, tokens per data source, and the memory's weight norms and theta per block
    (monitors attached for that step only)."""

    def __init__(self, cfg: RunConfig, flops_per_token: float, world: int, manifest, loader):
        self.cfg, self.flops_per_token, self.world = cfg, flops_per_token, world
        self.manifest, self.loader = manifest, loader

    def on_start(self, trainer) -> None:
        self.peak = device_peak_flops(trainer.device)
        self.meter = Throughput()
        self.memory = MemoryMonitors(trainer.engine.module, self.cfg.model.n_layers, trainer.device)

    def _logs(self, trainer, step: int) -> bool:
        return step % self.cfg.logging.interval == 0 or step == trainer.steps

    def step_context(self, trainer):
        if self._logs(trainer, trainer.progress.step + 1):
            return self.memory.attached()
        return contextlib.nullcontext()

    def after_step(self, trainer, result, batch) -> None:
        p = trainer.progress
        self.meter.add(trainer.tokens_per_step)
        if not self._logs(trainer, p.step):
            return
        memory = self.memory.metrics()  # collective
        tps, step_time = self.meter.read()
        trainer.record({"step": p.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                        "tokens": p.tokens, "tokens_per_s": tps,
                        "mfu": mfu(self.flops_per_token, tps, self.world, self.peak),
                        "step_time": step_time, "skipped_steps": p.skipped,
                        **({} if result.cp_idle is None else {"cp_idle": result.cp_idle}),
                        **source_tokens(self.manifest, self.loader, self.cfg.data.seq_len), **memory})


class MetricSinks(Callback):
    """Console, `metrics.jsonl`, TensorBoard, wandb (rank 0). At the start the log is cut back to
    the step training starts from: lines a killed run wrote after its checkpoint are redone."""

    def __init__(self, cfg: RunConfig, run_dir: Path, enabled: bool):
        self.cfg, self.run_dir, self.enabled = cfg, run_dir, enabled
        self.loggers: MetricLoggers | None = None

    def on_start(self, trainer) -> None:
        if self.enabled:
            truncate_metrics(self.run_dir / "metrics.jsonl", trainer.progress.step, trainer.log)
        self.loggers = MetricLoggers(self.cfg, self.run_dir, self.cfg.train.steps, enabled=self.enabled)

    def on_metrics(self, trainer, metrics: dict) -> None:
        self.loggers.log(metrics)

    def close(self, trainer) -> None:
        if self.loggers is not None:
            self.loggers.close()


def truncate_metrics(path: Path, step: int, log) -> None:
    """Keep the lines of steps up to `step`. A line that does not parse (a run killed mid-write)
    is dropped too, and said."""
    if not path.exists():
        return
    keep, torn = [], 0
    for line in filter(str.strip, path.read_text(errors="replace").splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            torn += 1
        elif record.get("step", 0) <= step:
            keep.append(line)
    if torn:
        log(f"[metrics] dropped {torn} unreadable line(s) of {path} (a run killed mid-write)")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
