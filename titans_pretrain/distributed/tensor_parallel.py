"""Tensor and sequence parallelism (``parallel.tp``) for a single-device TitansLM, applied from outside.

Layout (Megatron-style, with DTensor on the mesh's ``"tp"`` dim):

* **Heads.** Attention and the memory layer are split by heads: q, k, v, the output gate and the
  per-head gate projections (theta, eta, alpha: weight rows and biases) column-wise; the output
  projections row-wise. The per-head parameters that are not linear layers, the learned initial
  memory ``M_0`` ``(H, d_in, d_out)``, the depthwise conv weights ``(H*D, 1, K)`` and the per-head
  output norm ``(H, 1, D)``, are ``Shard(0)`` DTensors: every rank keeps only its heads, so the
  memory update, the conv and the norm run on local heads with no communication (the method keeps
  every channel mix inside a head for exactly this reason).
* **MLP.** SwiGLU gate/up column-wise, down row-wise.
* **Vocabulary.** The embedding is row-wise (vocab-sharded) and the LM head column-wise over the
  vocabulary with DTensor logits, so the loss runs under ``loss_parallel`` (see :func:`loss_context`)
  and the full ``(B, T, V)`` logits never exist on one rank.
* **Sequence parallel.** Between blocks the residual stream is split along the sequence
  (``(B, T/tp, d)`` per rank); the MLP's pre-norm and the final norm run on that shard. Each block's
  token mixer (attention and memory need the whole sequence) gathers the residual, runs with its
  heads split, and keeps its sequence shard of the result. The MLP gathers its normed input and
  reduce-scatters its output (Megatron SP); the mixer all-reduces its output and keeps its shard
  (twice the volume of a reduce-scatter, but one code path for the four block kinds, whose
  residual adds sit inside ``mix``).

How it stays out of the model code: linear and embedding layers get DTensor parallel styles (local
tensors in and out); every other parameter of a block becomes a DTensor (``Shard(0)`` per head, or
``Replicate``) and the block's ``forward`` is wrapped so that, during the call, the modules see
``param.to_local()`` in place of the DTensor (an instance attribute that shadows the parameter;
the parameter itself, its name and its checkpoint key are untouched). Modules that reshape by
``n_heads`` get the local head count. Gradients of replicated parameters are exact: every place
where head-local values meet replicated ones goes through a DTensor linear layer, whose backward
all-reduces the input gradient.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

from titans_pretrain.config import check_tp_model
from titans_pretrain.models.attention import Attention
from titans_pretrain.models.memory import CausalDepthwiseConv, MemoryLayer
from titans_pretrain.models.norms import RMSNorm

__all__ = ["apply_tensor_parallel", "loss_context", "parallelize_block",
           "parallelize_embedding", "parallelize_head"]

# DTensor warns on every 2-D (dp_shard x tp) norm reduction that two collectives run instead of one:
# true, harmless at these sizes, and one line per step in the training log.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

_MEMORY_COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "theta_proj", "eta_proj", "alpha_proj")


def loss_context(tp: int):
    """Context for forward AND backward of the loss: vocab-parallel cross-entropy when tp > 1."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------ helpers
def _distribute_param(module: nn.Module, name: str, mesh: DeviceMesh, placement) -> None:
    p = module._parameters[name]
    module.register_parameter(name, nn.Parameter(distribute_tensor(p.data, mesh, [placement]),
                                                 requires_grad=p.requires_grad))


def _gather_seq(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """(B, T/tp, ...) sequence shard -> (B, T, ...) on every rank (backward: keep the shard)."""
    return DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def _keep_seq_shard(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """(B, T, ...) identical on every rank -> this rank's sequence shard (backward: all-gather)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()


def _sp_mix(mix, mesh: DeviceMesh, x, state):
    full, new_state = mix(_gather_seq(x, mesh), state)
    return _keep_seq_shard(full, mesh), new_state


def _localized_forward(forward, params: list[tuple[nn.Module, str]], *args, **kwargs):
    """Run ``forward`` with each DTensor parameter in ``params`` seen as its local shard."""
    for module, name in params:
        p = module._parameters[name]
        module.__dict__[name] = p.to_local() if isinstance(p, DTensor) else p
    try:
        return forward(*args, **kwargs)
    finally:
        for module, name in params:
            module.__dict__.pop(name, None)


def _local_heads(module: nn.Module, tp: int) -> None:
    if module.n_heads % tp:
        raise ValueError(f"{type(module).__name__} has {module.n_heads} heads, not divisible by parallel.tp={tp}")
    module.n_heads //= tp


# ------------------------------------------------------------------------------------ the parts
def parallelize_embedding(model: nn.Module, mesh: DeviceMesh) -> None:
    """Vocab-sharded embedding; output is this rank's sequence shard (B, T/tp, d)."""
    parallelize_module(model.embed, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)))


def parallelize_head(model: nn.Module, mesh: DeviceMesh) -> None:
    """Final norm on the sequence shard; LM head column-wise over the vocabulary, DTensor logits."""
    parallelize_module(model.norm, mesh, SequenceParallel())
    parallelize_module(model.lm_head, mesh, ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                                            use_local_output=False))


def parallelize_block(block: nn.Module, mesh: DeviceMesh) -> None:
    """Split one Titans block (any variant) over ``mesh`` (1-D, the tp dim). See the module docstring."""
    tp = mesh.size()
    styled: set[int] = set()  # parameters owned by a DTensor parallel style
    for module in block.modules():
        if isinstance(module, MemoryLayer):
            for name in _MEMORY_COLWISE:
                parallelize_module(getattr(module, name), mesh, ColwiseParallel())
            parallelize_module(module.out_proj, mesh, RowwiseParallel())
            _local_heads(module, tp)
        elif isinstance(module, Attention):
            for name in ("q_proj", "k_proj", "v_proj"):
                parallelize_module(getattr(module, name), mesh, ColwiseParallel())
            parallelize_module(module.o_proj, mesh, RowwiseParallel())
            _local_heads(module, tp)
    parallelize_module(block.mlp_norm, mesh, SequenceParallel())
    parallelize_module(block.mlp, mesh, PrepareModuleInput(input_layouts=(Shard(1),),
                                                           desired_input_layouts=(Replicate(),)))
    parallelize_module(block.mlp.gate_proj, mesh, ColwiseParallel())
    parallelize_module(block.mlp.up_proj, mesh, ColwiseParallel())
    parallelize_module(block.mlp.down_proj, mesh, RowwiseParallel(output_layouts=Shard(1)))
    styled.update(id(p) for p in block.parameters() if isinstance(p, DTensor))

    local: list[tuple[nn.Module, str]] = []  # the rest: DTensors seen as local shards during forward
    for module in block.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in styled:
                continue
            per_head = (isinstance(module, CausalDepthwiseConv)
                        or (isinstance(module, RMSNorm) and p.dim() == 3)  # per-head norm (H, 1, D)
                        or (isinstance(module, nn.ParameterList) and p.dim() == 3))  # M_0 (H, din, dout)
            if isinstance(module, nn.ParameterList) and not any(
                    m.initial_weights is module for m in block.modules() if isinstance(m, MemoryLayer)):
                raise NotImplementedError(f"unexpected ParameterList in {type(block).__name__}")
            _distribute_param(module, name, mesh, Shard(0) if per_head else Replicate())
            local.append((module, name))
    block.mix = functools.partial(_sp_mix, block.mix, mesh)
    block.forward = functools.partial(_localized_forward, block.forward, local)


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Tensor + sequence parallel over the 1-D ``mesh`` for every part ``model`` holds (a TitansLM,
    or a pipeline stage's pruned copy where some of embed/blocks/norm/lm_head are absent)."""
    check_tp_model(model.config, mesh.size())
    if getattr(model, "embed", None) is not None:
        parallelize_embedding(model, mesh)
    blocks = model.blocks.values() if isinstance(model.blocks, nn.ModuleDict) else model.blocks
    for block in blocks:
        parallelize_block(block, mesh)
    if getattr(model, "lm_head", None) is not None:
        parallelize_head(model, mesh)
