"""Context-parallel checks that run inside spawned ranks (importable by the spawned interpreters)."""
from __future__ import annotations

import torch

SEQ = 32


def small_config(variant: str, **kw):
    from titans_pretrain.models import TitansConfig

    base = dict(variant=variant, vocab_size=61, d_model=16, n_layers=2, n_heads=2, memory_depth=2,
                memory_expansion=2, chunk_size=4, segment_len=8, window=12, n_persistent=2,
                theta_max=0.3, conv_kernel=3)
    base.update(kw)
    return TitansConfig(**base)


def batch(cfg, batch_size: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :SEQ // 2 + 3] = -100  # ignored tokens unevenly spread over the slices
    labels[1, -5:] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


def _model(cfg, ac: bool):
    from titans_pretrain.distributed.parallelize import apply_activation_checkpointing
    from titans_pretrain.models import TitansLM

    torch.manual_seed(0)
    model = TitansLM(cfg).double()
    if ac:
        apply_activation_checkpointing(model)
    return model


def model_case(rank: int, world: int, cfg, cp_size: int, microbatches: int = 1, ac: bool = False) -> dict:
    """Loss and gradients (fp64) of one batch with the sequence split over `cp_size` ranks (the
    `world // cp_size` groups all run the same batch), and the same on one process."""
    from torch.distributed.device_mesh import init_device_mesh

    from titans_pretrain.distributed.context_parallel import ContextParallel, apply_context_parallel

    b = batch(cfg)
    ref_model = _model(cfg, ac=False)
    ref_loss = ref_model(b["input_ids"], labels=b["labels"]).loss
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in ref_model.named_parameters()}

    mesh = init_device_mesh("cpu", (world // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
    cp = ContextParallel(mesh["cp"].get_group(), microbatches)
    model = _model(cfg, ac)
    apply_context_parallel(model, cp)
    out = []
    for _ in range(2):  # the second step reuses the cached state layouts
        model.zero_grad(set_to_none=True)
        local = cp.loss(model(cp.shard(b["input_ids"])).logits, cp.shard(b["labels"]))
        local.backward()
        cp.flush()
        cp.sync_gradients(list(model.parameters()))
        out.append(float(cp.sum_over_group(local)))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    err = max(((grads[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref)
    return {"losses": out, "ref_loss": float(ref_loss.detach()), "max_rel_grad_err": err,
            "wait_s": cp.stats.wait_forward_s + cp.stats.wait_backward_s,
            "boundary_bytes": dict(cp.stats.boundary_bytes)}


def model_cases(rank: int, world: int, cases: dict) -> dict:
    return {name: model_case(rank, world, small_config(**c.pop("model")), **c) for name, c in cases.items()}
