"""Rank bodies for the Megatron tests (run on real gloo processes by ``spawn_ranks``).

One launch of two processes runs, per variant: Megatron at TP=1 (each rank alone in its TP group)
next to the native model; the native weights written as a Megatron checkpoint by the converter ->
TP=2 loads it and trains -> saves at TP=2 -> TP=1 loads that.
``parallel_state`` is torn down and rebuilt between the phases, inside the same processes.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_cpu_compat import apply_cpu_compat  # noqa: E402


def _setup_parallel(tp: int) -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)


def _build(titans, dtype):
    from titans_pretrain.integrations.megatron import titans_gpt_model, titans_transformer_config
    from megatron.core import parallel_state as ps

    config = titans_transformer_config(titans, use_cpu_initialization=True, params_dtype=dtype,
                                       tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size())
    return titans_gpt_model(titans, config)


def _loss(model, ids, labels):
    return model(ids, None, None, labels=labels).mean()


def _train(model, ids, labels, steps: int, lr: float):
    """``steps`` SGD steps; returns the losses and the gradients of the first step (local shards)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grads = [], None
    for step in range(steps):
        opt.zero_grad()
        loss = _loss(model, ids, labels)
        loss.backward()
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, grads


def _save(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), path)


def _load(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state, strict=False)


def _save_values(model, values: dict, path: str) -> None:
    """Save ``values`` (local shards by parameter name) through ``model``'s sharded layout."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(values[n])
    _save(model, path)


def _full_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def tp_roundtrip(rank: int, world: int, cases: list, workdir: str, steps: int, lr: float) -> dict:
    """Per case ``(name, titans_config, native_state, ids, labels)``: see the module docstring.

    Returns (rank 0's view; TP=1 numbers are the same on both ranks) per case: native and Megatron
    TP=1 logits, TP=1 and TP=2 losses, TP=1 first-step gradients in native names, the TP=2
    first-step gradients of the memory mixer's local shards, and the TP=1 state after training next
    to the state reloaded at TP=1 from the TP=2 checkpoint."""
    warnings.filterwarnings("ignore")
    stack = apply_cpu_compat()
    from titans_pretrain.integrations.megatron_convert import (load_into_megatron, megatron_to_native,
                                                               save_megatron_checkpoint)
    from titans_pretrain.models import TitansLM

    out = {}
    try:
        for name, titans, native_state, ids, labels in cases:
            dtype = next(iter(native_state.values())).dtype
            native = TitansLM(titans).to(dtype)
            native.load_state_dict(native_state)
            res = {"native_logits": native(ids).logits.detach()}
            native_loss = native(ids, labels=labels).loss
            native_loss.backward()
            res["native_loss"] = native_loss.item()
            res["native_grads"] = {n: p.grad.clone() for n, p in native.named_parameters()}

            # TP=1: weights from the native model, logits, a few steps; the initial weights saved.
            _setup_parallel(1)
            torch.manual_seed(0)
            m1 = _build(titans, dtype)
            load_into_megatron(m1, native_state, titans)
            res["tp1_logits"] = m1(ids, None, None).detach()
            init_dir = f"{workdir}/{name}_init_tp1"  # the converter's checkpoint writer
            save_megatron_checkpoint(native_state, titans, init_dir)
            res["tp1_losses"], g1 = _train(m1, ids, labels, steps, lr)
            res["tp1_grads_native"] = megatron_to_native(g1, titans)
            res["tp1_trained"] = megatron_to_native(_full_state(m1), titans)

            # TP=2: load the TP=1 checkpoint, train the same steps, save at TP=2.
            _setup_parallel(2)
            m2 = _build(titans, dtype)
            _load(m2, init_dir)
            res["tp2_losses"], g2 = _train(m2, ids, labels, steps, lr)
            res["tp2_local_shapes"] = {n: tuple(g.shape) for n, g in g2.items()}
            res["tp2_trained_logits"] = m2(ids, None, None, runtime_gather_output=True).detach()
            tp2_dir = f"{workdir}/{name}_trained_tp2"
            _save(m2, tp2_dir)
            grads_dir = f"{workdir}/{name}_grads_tp2"  # the first step's TP=2 gradients, as a checkpoint
            _save_values(_build(titans, dtype), g2, grads_dir)

            # TP=1 again: the TP=2 checkpoint reloads into a TP=1 model.
            _setup_parallel(1)
            m3 = _build(titans, dtype)
            _load(m3, tp2_dir)
            res["tp2_reloaded_at_tp1"] = megatron_to_native(_full_state(m3), titans)
            res["reloaded_logits"] = m3(ids, None, None).detach()
            m4 = _build(titans, dtype)
            _load(m4, grads_dir)
            res["tp2_grads_native"] = megatron_to_native(_full_state(m4), titans)
            out[name] = res
    finally:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        stack.close()
    return out


def megatron_training(rank: int, world: int, titans, ids, labels, steps: int, workdir: str) -> dict:
    """Megatron's own training stack on Titans layers: seeded init (saved per TP size), Megatron DDP,
    the distributed Adam optimizer with gradient clipping, ``steps`` steps at TP=1 (data parallel 2,
    same batch on both ranks) and then TP=2. Returns ``{tp: [(loss, grad_norm), ...]}``."""
    warnings.filterwarnings("ignore")
    stack = apply_cpu_compat()
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    out = {}
    try:
        for tp in (1, 2):
            _setup_parallel(tp)
            torch.manual_seed(0)
            model = _build(titans, torch.float32)
            _save(model, f"{workdir}/seeded_init_tp{tp}")
            ddp = DistributedDataParallel(
                config=model.config, module=model,
                ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True))
            opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0,
                                                         use_distributed_optimizer=True), [ddp])
            history = []
            for _ in range(steps):
                ddp.zero_grad_buffer()
                opt.zero_grad()
                loss = ddp(ids, None, None, labels=labels).mean()
                loss.backward()
                ddp.finish_grad_sync()
                ok, grad_norm, _ = opt.step()
                assert ok
                history.append((loss.item(), grad_norm))
            out[tp] = history
        out["mixer_all_reduces"] = _count_mixer_all_reduces(titans, ids)
    finally:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        stack.close()
    return out


def pipeline_parallel(rank: int, world: int, titans, ids, labels, workdir: str) -> dict:
    """The Titans GPT through Megatron's pipeline schedule at PP=1 (each rank whole, data parallel 2)
    and PP=2 (a stage per rank), same weights (PP=1's seeded init, saved and loaded at PP=2), two
    microbatches. Returns ``{pp: losses}`` and saves each size's gradients as a checkpoint
    (``grads_pp{pp}``) for the test to compare parameter by parameter."""
    warnings.filterwarnings("ignore")
    stack = apply_cpu_compat()
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from titans_pretrain.integrations.megatron import titans_gpt_model, titans_transformer_config

    def forward_step(data_iterator, model):
        out = model(ids, None, None, labels=labels)
        return out, lambda o: (o.mean(), {"loss": o.mean().detach()})

    out = {}
    try:
        for pp in (1, 2):
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            ps.initialize_model_parallel(pipeline_model_parallel_size=pp)
            config = titans_transformer_config(titans, use_cpu_initialization=True, pipeline_model_parallel_size=pp,
                                               pipeline_dtype=torch.float32)

            def build():
                return titans_gpt_model(titans, config, pre_process=ps.is_pipeline_first_stage(),
                                        post_process=ps.is_pipeline_last_stage())

            torch.manual_seed(0)
            model = build()
            if pp == 1:
                _save(model, f"{workdir}/pp_init")
            else:
                _load(model, f"{workdir}/pp_init")
            losses = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([None, None]), model=[model],
                num_microbatches=2, seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=False)
            out[pp] = [x["loss"].item() for x in losses] if losses else None
            _save_values(build(), {n: p.grad for n, p in model.named_parameters()}, f"{workdir}/grads_pp{pp}")
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        stack.close()
    return out


def _count_mixer_all_reduces(titans, ids) -> tuple[int, int]:
    """All-reduces of one TitansMemoryMixer at the current TP size: (forward, backward)."""
    from unittest import mock

    import torch.distributed as dist

    from titans_pretrain.integrations.megatron import TitansMemoryMixer, titans_transformer_config
    from megatron.core import parallel_state as ps

    config = titans_transformer_config(titans, use_cpu_initialization=True,
                                       tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size())
    mixer = TitansMemoryMixer(config, titans)
    x = torch.randn(ids.shape[1], ids.shape[0], titans.d_model, requires_grad=True)
    calls = []
    real = dist.all_reduce
    with mock.patch.object(dist, "all_reduce", lambda *a, **k: calls.append(1) or real(*a, **k)):
        out, _ = mixer(x)
        forward = len(calls)
        out.sum().backward()
    return forward, len(calls) - forward
