"""Apply parallelism to a single-device model from outside: tensor parallel, activation
checkpointing, compile, then FSDP2 (HSDP when dp_replicate > 1) or DDP. The model code never changes for any of it."""
from __future__ import annotations

import functools

from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from titans_pretrain.config import ParallelConfig
from titans_pretrain.distributed.mesh import ParallelDims


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward. Done by replacing the instance's forward (not wrapping
    the module), so parameter names, and with them checkpoints, stay identical."""
    for block in model.blocks:
        block.forward = functools.partial(_checkpointed, block.forward)


def parallelize(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig) -> nn.Module:
    """Return the model to train (the same object for FSDP2; a DDP wrapper for ddp)."""
    if cfg.tp > 1:  # first: AC and FSDP wrap the already split blocks
        from titans_pretrain.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, dims.mesh["tp"])
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        for block in model.blocks:
            block.compile()
    if cfg.data_parallel == "ddp":
        device_ids = [model.embed.weight.device.index] if model.embed.weight.is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids,
                                       process_group=dims.dp_mesh.get_group())
    mesh = dims.dp_mesh
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled
