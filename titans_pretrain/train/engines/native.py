"""The native engine: FSDP2/DDP, tensor, pipeline and context parallel around the model, the
optimizer and schedule, one optimizer step, DCP checkpoint I/O (the `Engine` contract of
`train/engines/base.py`)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from titans_pretrain.config import RunConfig
from titans_pretrain.distributed.context_parallel import ContextParallel
from titans_pretrain.distributed.mesh import ParallelDims
from titans_pretrain.distributed.parallelize import parallelize, set_grad_sync, unwrap
from titans_pretrain.distributed.pipeline import Pipeline
from titans_pretrain.distributed.precision import autocast
from titans_pretrain.distributed.tensor_parallel import loss_context
from titans_pretrain.train.engines.base import StepResult, global_norm, mean_over_dp
from titans_pretrain.train.optim import (build_optimizer, build_scheduler, optimizer_settings,
                                         restore_schedule)


class NativeEngine:
    name = "native"

    def __init__(self, model: nn.Module, cfg: RunConfig, dims: ParallelDims, device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        self.cp_idle: float | None = None
        self.cp = (ContextParallel(dims.mesh["cp"].get_group(), cfg.parallel.cp_microbatches)
                   if dims.layout.cp > 1 else None)
        self.pipeline = None
        if dims.layout.pp > 1:  # each rank keeps its stages; tp/ac/cp/FSDP2 are applied per stage
            self.pipeline = Pipeline(model, cfg, dims, device, self.cp)
            self.model = self.pipeline.model
        else:
            self.model = parallelize(model, dims, cfg.parallel, self.cp, device=device)
        self.optimizer = build_optimizer(unwrap(self.model), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self._settings = optimizer_settings(self.scheduler.optimizer)  # this run's, kept on resume
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def module(self) -> nn.Module:
        """The TitansLM (for generation); under FSDP2 its forward is still collective."""
        return unwrap(self.model)

    def named_parameters(self):
        """(checkpoint name, parameter) of every parameter this rank holds (DTensors when sharded;
        under pipeline parallelism only this rank's stages)."""
        return unwrap(self.model).named_parameters()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def loss_context(self):
        """Wrap forward AND backward of the loss: vocabulary-parallel cross-entropy under tp > 1."""
        return loss_context(self.dims.layout.tp)

    def forward_loss(self, batch: dict) -> torch.Tensor:
        """The micro-batch's mean token loss; under context parallelism this rank's share of it
        (the sum over the cp group is the mean over the whole sequences). A DTensor under tp > 1:
        call it, and backward, inside :meth:`loss_context`."""
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        if self.cp is not None:
            ids, labels = self.cp.shard(ids), self.cp.shard(labels)
            self.cp.count_tokens(labels)
            with autocast(self.cfg, self.device):
                return self.cp.loss(self.model(ids).logits, labels)
        with autocast(self.cfg, self.device):
            return self.model(ids, labels=labels).loss

    def _sequence_loss(self, local: torch.Tensor) -> torch.Tensor:
        """Sum the cp ranks' shares back into the loss of the whole sequences."""
        return local if self.cp is None else self.cp.sum_over_group(local)

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """Accumulate the gradients of the mean loss over the global batch in ``.grad`` (reduced
        over data- and context-parallel ranks); return that loss."""
        self.model.train()
        start = time.perf_counter()
        if self.pipeline is not None:
            local = self.pipeline.forward_backward(micro_batches)
        else:
            n = len(micro_batches)
            total = torch.zeros((), device=self.device)
            for i, batch in enumerate(micro_batches):
                set_grad_sync(self.model, i == n - 1)
                with self.loss_context():
                    loss = self.forward_loss(batch)
                    (loss / n).backward()
                total += global_norm(loss.detach()).float()
            local = total / n
        if self.cp is not None:
            self.cp.flush()
            self.cp.sync_gradients(self.params)
            self.cp_idle = self.cp.idle_fraction(time.perf_counter() - start)
        return mean_over_dp(self._sequence_loss(local), self.dims)

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """Accumulate gradients, clip, and step unless the loss or norm is not finite."""
        loss = self.forward_backward(micro_batches)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        if self.pipeline is not None:  # the norm spans every stage
            norm = self.pipeline.grad_norm_(self.params, max_norm)
        else:
            norm = global_norm(torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=False))
        finite = bool(torch.isfinite(loss).item() and torch.isfinite(norm).item())
        lr = self.lr
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(float(loss), float(norm), finite, lr, self.cp_idle)

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        self.model.eval()
        if self.pipeline is not None:
            loss = self.pipeline.evaluate_batches(list(batches))
        else:
            total, count = torch.zeros((), device=self.device), 0
            for batch in batches:
                with self.loss_context():
                    total += global_norm(self.forward_loss(batch)).float()
                count += 1
            loss = total / max(1, count)
        if self.cp is not None:
            self.cp.flush()
        self.model.train()
        return float(mean_over_dp(self._sequence_loss(loss), self.dims))

    # ------------------------------------------------------------------ checkpoint I/O
    def save(self, folder: Path, async_save: bool = False):
        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        if async_save:
            return dcp.async_save(state, checkpoint_id=str(folder))
        dcp.save(state, checkpoint_id=str(folder))
        return None

    def load(self, folder: Path) -> None:
        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict) -> None:
        restore_schedule(self.scheduler, state, self._settings)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor | None:
        """Greedy continuation; None under tensor/pipeline parallelism (generation runs on one
        device: `load_checkpoint(run_dir).generate(...)`)."""
        if self.dims.layout.tp > 1 or self.dims.layout.pp > 1:
            return None
        self.model.eval()
        out = unwrap(self.model).generate(ids, max_new_tokens)
        self.model.train()
        return out
