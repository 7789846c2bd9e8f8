"""What the trainer, `profile` and the tests need of an engine, and what both engines share.

An engine owns the parallel model, the optimizer and the schedule: the loop drives it through
`train_step`, `evaluate`, `save`/`load` (the shards inside a checkpoint folder the checkpointer
prepared) and the scheduler state; it never asks which engine it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from titans_pretrain.distributed.mesh import ParallelDims


@dataclass
class StepResult:
    loss: float  # mean token loss over the global batch
    grad_norm: float  # global, before clipping
    finite: bool  # False: the update was skipped
    lr: float  # the learning rate this step used
    cp_idle: float | None = None  # context parallel: mean fraction of the step a rank waited for a neighbour


def global_norm(value) -> torch.Tensor:
    """A DTensor reduction's full value; a plain tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def mean_over_dp(value: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    if dims.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=_dp_group(dims))
        value /= dims.dp_size
    return value


def _dp_group(dims: ParallelDims):
    if dims.layout.dp_replicate > 1:
        return dims.mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group()
    return dims.mesh["dp_shard"].get_group()



class Engine(Protocol):
    name: str  # recorded in each checkpoint: a checkpoint resumes only in the engine that wrote it

    @property
    def module(self) -> nn.Module: ...  # the TitansLM (for generation and monitors)

    @property
    def lr(self) -> float: ...

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def train_step(self, micro_batches: list[dict]) -> StepResult: ...

    def evaluate(self, batches) -> float: ...

    def save(self, folder: Path, async_save: bool = False) -> Any: ...

    def load(self, folder: Path) -> None: ...

    def scheduler_state(self) -> dict: ...

    def load_scheduler_state(self, state: dict) -> None: ...

    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor | None: ...
