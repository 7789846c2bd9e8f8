"""Pipeline parallelism (``parallel.pp``) with ``torch.distributed.pipelining``, applied from outside.

The model is built whole on every rank (same seed), then each rank keeps only its stages:

* **Split.** ``pp x pp_stages_per_rank`` stages of consecutive blocks; the embedding rides on the
  first stage, the final norm and LM head on the last. Block counts per stage come from
  ``parallel.pp_layers`` or are balanced by a per-layer cost estimate (:func:`balanced_split`:
  training FLOPs per token of a block, with the LM head's matmul counted on the last stage).
* **Stages per rank.** ``1f1b`` and ``gpipe`` run one stage per rank; ``interleaved_1f1b`` runs
  ``pp_stages_per_rank >= 2`` stages per rank in loop order (rank ``r`` holds stages ``r, r + pp,
  ...``), which shrinks the pipeline bubble by that factor.
* **Names.** A rank's parameters live in one :class:`StageModel` whose parameter names are the
  TitansLM's (``blocks`` is a ModuleDict keyed by the global block index), so DCP checkpoints of
  any pp/tp/dp layout are the same keys and reshard on load (``load_checkpoint`` reads them in one
  process). Each stage is a thin :class:`StageView` over the StageModel's modules: the module the
  schedule runs, and the FSDP2 root of its stage.
* **Composition.** Inside a stage the usual order applies: tensor/sequence parallel (the activation
  sent between stages is then the ``(B, T/tp, d)`` sequence shard), activation checkpointing,
  compile, FSDP2 over the data-parallel mesh. Context parallelism composes the same way: its state
  relay runs inside each stage's blocks.
* **Micro-batches** are the gradient-accumulation micro-batches; the schedule scales gradients by
  their count, so the update equals the non-pipelined mean-loss step.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from titans_pretrain.config import RunConfig
from titans_pretrain.distributed.mesh import ParallelDims
from titans_pretrain.distributed.precision import autocast
from titans_pretrain.models.flops import flops_per_token
from titans_pretrain.models.titans import lm_loss

if TYPE_CHECKING:  # pragma: no cover
    from titans_pretrain.distributed.context_parallel import ContextParallel

__all__ = ["Pipeline", "StageModel", "StageView", "balanced_split", "stage_layer_ranges"]

_SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B}


# ------------------------------------------------------------------------------------ the split
def layer_costs(model: nn.Module, seq_len: int) -> tuple[float, float, float]:
    """Per-token training FLOPs of (embedding, one block, final norm + LM head): the cost estimate
    that balances stages. Blocks of one model are identical, so one number covers them."""
    cfg = model.config
    head = 6.0 * cfg.d_model * cfg.vocab_size
    block = (flops_per_token(model, cfg, seq_len) - head) / cfg.n_layers
    return 0.0, block, head


def balanced_split(n_layers: int, n_stages: int, block_cost: float, first_extra: float = 0.0,
                   last_extra: float = 0.0) -> list[int]:
    """Blocks per stage (consecutive, >= 1 each) minimising the costliest stage, where the first
    stage also pays ``first_extra`` and the last ``last_extra`` (ties: the most even split)."""
    if n_layers < n_stages:
        raise ValueError(f"{n_layers} blocks cannot fill {n_stages} pipeline stages (at least one each); "
                         "lower parallel.pp or parallel.pp_stages_per_rank")
    best: dict[tuple[int, int], tuple[float, float, list[int]]] = {}

    def solve(start: int, stage: int) -> tuple[float, float, list[int]]:
        """(costliest stage, sum of squared stage costs, counts) for blocks start.. on stages stage.."""
        if (start, stage) in best:
            return best[start, stage]
        left = n_stages - stage
        extra = first_extra if stage == 0 else 0.0
        if left == 1:
            cost = (n_layers - start) * block_cost + extra + last_extra
            out = (cost, cost * cost, [n_layers - start])
        else:
            out = (math.inf, math.inf, [])
            for n in range(1, n_layers - start - left + 2):
                cost = n * block_cost + extra
                r_max, r_sq, counts = solve(start + n, stage + 1)
                cand = (max(cost, r_max), cost * cost + r_sq, [n] + counts)
                if cand[:2] < out[:2]:
                    out = cand
        best[start, stage] = out
        return out

    return solve(0, 0)[2]


def stage_layer_ranges(counts: list[int]) -> list[range]:
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


# ------------------------------------------------------------------------------------ modules
class StageModel(nn.Module):
    """The parts of a TitansLM one pipeline rank holds, under the TitansLM's parameter names."""

    def __init__(self, model: nn.Module, layers: list[int], first: bool, last: bool):
        super().__init__()
        self.config = model.config
        if first:
            self.embed = model.embed
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if last:
            self.norm = model.norm
            self.lm_head = model.lm_head


class StageView(nn.Module):
    """One pipeline stage: ids (first stage) or hidden states in; hidden states or logits out."""

    def __init__(self, owner: StageModel, layers: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.embed = owner.embed
        self.blocks = nn.ModuleList(owner.blocks[str(i)] for i in layers)
        if last:
            self.norm, self.lm_head = owner.norm, owner.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x)) if self.last else x


# ------------------------------------------------------------------------------------ the runner
class Pipeline:
    """Splits ``model`` for this rank, applies tp/ac/compile/FSDP2 per stage, runs the schedule."""

    def __init__(self, model: nn.Module, cfg: RunConfig, dims: ParallelDims, device: torch.device,
                 cp: ContextParallel | None = None):
        p, layout = cfg.parallel, dims.layout
        self.cfg, self.dims, self.device, self.cp = cfg, dims, device, cp
        self.pp_mesh = dims.mesh["pp"]
        self.group = self.pp_mesh.get_group()
        self.pp, self.rank = layout.pp, self.pp_mesh.get_local_rank()
        n_stages = p.pp * p.pp_stages_per_rank
        n_layers = model.config.n_layers
        if p.pp_layers is not None:
            counts = list(p.pp_layers)
            if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 1:
                raise ValueError(f"parallel.pp_layers={counts}: need {n_stages} counts >= 1 summing to "
                                 f"model.n_layers={n_layers}")
        else:
            embed_cost, block_cost, head_cost = layer_costs(model, cfg.data.seq_len)
            counts = balanced_split(n_layers, n_stages, block_cost, embed_cost, head_cost)
        self.counts = counts
        ranges = stage_layer_ranges(counts)
        self.stage_ids = [self.rank + k * self.pp for k in range(p.pp_stages_per_rank)]
        layers = [i for s in self.stage_ids for i in ranges[s]]
        first, last = 0 in self.stage_ids, n_stages - 1 in self.stage_ids
        self.is_first, self.is_last = first, last
        self.model = StageModel(model, layers, first, last)
        self.views = [StageView(self.model, ranges[s], s == 0, s == n_stages - 1) for s in self.stage_ids]
        self._parallelize(p)
        self.stages = [PipelineStage(view, s, n_stages, device, group=self.group)
                       for s, view in zip(self.stage_ids, self.views)]
        n_micro = layout.grad_accum
        schedule_cls = _SCHEDULES[p.pp_schedule]
        loss_fn = lm_loss if cp is None else cp.loss  # under cp: this slice's share of the mean
        if p.pp_schedule == "interleaved_1f1b":
            self.schedule = schedule_cls(self.stages, n_microbatches=n_micro, loss_fn=loss_fn)
        else:
            self.schedule = schedule_cls(self.stages[0], n_microbatches=n_micro, loss_fn=loss_fn)
        self.last_rank = dist.get_global_rank(self.group, self.pp - 1)

    def _parallelize(self, p) -> None:
        """tp, activation checkpointing, compile, FSDP2 on this rank's parts, as without a pipeline;
        each stage module is an FSDP root, blocks stay gathered across micro-batches."""
        from titans_pretrain.distributed.parallelize import parallelize

        parallelize(self.model, self.dims, p, cp=self.cp, fsdp_roots=self.views, reshard_after_forward=False,
                    device=self.device)

    def _run(self, micro_batches: list[dict], train: bool) -> torch.Tensor:
        from titans_pretrain.distributed.tensor_parallel import loss_context

        ids = torch.cat([b["input_ids"] for b in micro_batches]).to(self.device)
        labels = torch.cat([b["labels"] for b in micro_batches]).to(self.device)
        if self.cp is not None:  # every stage of a cp rank works on its slice of the sequences
            ids, labels = self.cp.shard(ids), self.cp.shard(labels)
        args = (ids,) if self.is_first else ()
        losses: list = [] if self.is_last else None
        kwargs = {"target": labels, "losses": losses} if self.is_last else {}
        with autocast(self.cfg, self.device), loss_context(self.dims.layout.tp):
            if train:
                self.schedule.step(*args, **kwargs)
            else:
                self.schedule.eval(*args, **kwargs)
        if self.is_last:
            vals = [(x.full_tensor() if isinstance(x, DTensor) else x).detach().float() for x in losses]
            loss = torch.stack(vals).mean()
        else:
            loss = torch.zeros((), device=self.device)
        dist.broadcast(loss, src=self.last_rank, group=self.group)  # every rank logs the same loss
        return loss

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """Gradients of the mean loss over the micro-batches (the schedule scales by their count)."""
        return self._run(micro_batches, train=True)

    @torch.no_grad()
    def evaluate_batches(self, batches: list[dict]) -> torch.Tensor:
        """Mean loss over ``batches`` (forward only). The schedule splits each call into its
        ``grad_accum`` micro-batches, so the sequences go through in pieces of a training step's
        size; a trailing piece that does not split evenly is left out."""
        ids = torch.cat([b["input_ids"] for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        n, size = self.dims.layout.grad_accum, self.dims.layout.grad_accum * self.dims.layout.micro_batch_size
        total, count = torch.zeros((), device=self.device), 0
        for start in range(0, ids.shape[0], size):
            piece = slice(start, start + size)
            rows = ids[piece].shape[0]
            if rows % n:
                break
            total += self._run([{"input_ids": ids[piece], "labels": labels[piece]}], train=False) * rows
            count += rows
        for module in [*self.model.blocks.values(), *self.views]:  # no backward resharded them
            module.reshard()
        if count == 0:
            raise ValueError(f"pipeline evaluation needs at least {n} sequences (one per micro-batch); "
                             "raise train.val_batches")
        return total / count

    def grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip by the global norm over every stage (each rank holds only its stages' gradients)."""
        grads = [q.grad for q in params if q.grad is not None]
        local = torch.nn.utils.get_total_norm(grads, foreach=False)
        local = local.full_tensor() if isinstance(local, DTensor) else local
        total = local.float() ** 2
        dist.all_reduce(total, group=self.group)
        total = total.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
        return total
