"""Apply parallelism to a single-device model from outside, in this order: tensor parallel,
activation checkpointing, the context-parallel state relay, compile, then FSDP2 (HSDP when
dp_replicate > 1) or DDP over the data-parallel dims only (the cp ranks of a group hold the same
parameters; their gradients are summed by the engine after backward, so no per-block collective
couples the cp wavefront). The model code never changes for any of it."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from titans_pretrain.config import ParallelConfig
from titans_pretrain.distributed.context_parallel import (ContextParallel, apply_context_parallel,
                                                          blocks_of)
from titans_pretrain.distributed.meta_init import is_meta, materialize
from titans_pretrain.distributed.mesh import ParallelDims
from titans_pretrain.models import TitansLM


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward. Done by replacing the instance's forward (not wrapping
    the module), so parameter names, and with them checkpoints, stay identical."""
    for block in blocks_of(model):
        block.forward = functools.partial(_checkpointed, block.forward)


def parallelize(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig,
                cp: ContextParallel | None = None, fsdp_roots: list[nn.Module] | None = None,
                reshard_after_forward: bool | None = None, device: torch.device | None = None) -> nn.Module:
    """Return the model to train (the same object for FSDP2; a DDP wrapper for ddp).

    A model on the meta device (a TitansLM or a pipeline stage of one, built without drawing) is
    materialised on ``device`` once it is sharded (before DDP wraps it), each rank allocating and
    initialising only its shards, with the weights of an eager start (``meta_init.materialize``).

    With activation checkpointing and ``cp``, a block's slice is recomputed in backward from its
    received entry state (the relay stays outside the recomputed region). A pipeline stage passes
    its stage modules as ``fsdp_roots`` (the modules the schedule calls) and keeps its blocks
    gathered across micro-batches (``reshard_after_forward=False``; None is FSDP2's default:
    reshard all but the root)."""
    if cfg.tp > 1:  # first: AC and FSDP wrap the already split blocks
        from titans_pretrain.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, dims.mesh["tp"])
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cp is not None:
        apply_context_parallel(model, cp)
    if cfg.compile:
        for block in blocks_of(model):
            block.compile()
    if cfg.data_parallel == "ddp":
        _materialize_if_meta(model, device)
        device_ids = [model.embed.weight.device.index] if model.embed.weight.is_cuda else None
        # under cp, M_0 only enters the graph on the first slice: the other ranks must say so
        return DistributedDataParallel(model, device_ids=device_ids, process_group=dims.dp_mesh.get_group(),
                                       find_unused_parameters=cp is not None)
    mesh = dims.dp_mesh
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for root in fsdp_roots or [model]:
        fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward)
    _materialize_if_meta(model, device)
    return model


def _materialize_if_meta(model: nn.Module, device: torch.device | None) -> None:
    if not is_meta(model):
        return
    if device is None:
        raise ValueError("parallelize: the model is on the meta device; pass the device to materialise it on")
    config = model.config
    materialize(model, lambda: TitansLM(config, init=False), lambda m: m.reset_parameters(), device)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled
