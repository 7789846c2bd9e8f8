"""Functions that run inside spawned ranks (importable by the spawned interpreters)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"
# AdamW divides by sqrt(v) + eps: with the default eps (1e-8) a gradient entry near zero (a rare
# token's embedding row, M_0 at init) turns 1e-7 of summation-order noise into an O(lr) step of
# either sign. A larger eps keeps the after-update comparison meaningful at fp32 tolerance; every
# run and reference compared here uses it.
ADAM = ["optim.eps=1e-4"]


def global_batch(cfg, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    n = cfg.train.global_batch_tokens // cfg.data.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (n, cfg.data.seq_len + 1), generator=g)
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def rank_micro_batches(cfg, layout, batch: dict, dp_rank: int) -> list[dict]:
    per_rank = layout.global_batch_seqs // layout.dp_size
    mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()}
    m = layout.micro_batch_size
    return [{k: v[i:i + m] for k, v in mine.items()} for i in range(0, per_rank, m)]


def full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def build_engine(world: int, overrides: list[str], seed_offset: int = 0):
    """``(cfg, layout, dims, NativeEngine)`` of the debug config with ``ADAM`` and ``overrides``."""
    from titans_pretrain.config import load_config, resolve_layout
    from titans_pretrain.distributed.mesh import build_mesh
    from titans_pretrain.models import TitansLM
    from titans_pretrain.train.engines import NativeEngine
    from titans_pretrain.train.engines import seed_everything

    cfg = load_config(CONFIG, [*ADAM, *overrides])
    layout = resolve_layout(cfg, world)
    dims = build_mesh(layout, torch.device("cpu"))
    seed_everything(cfg.train.seed + seed_offset)
    return cfg, layout, dims, NativeEngine(TitansLM(cfg.model), cfg, dims, torch.device("cpu"))


def engine_run(rank: int, world: int, overrides: list[str], steps: int = 3) -> dict:
    """Gradients of the first global batch, then `steps` optimizer steps: losses, norms, weights."""
    from titans_pretrain.distributed.parallelize import unwrap

    cfg, layout, dims, engine = build_engine(world, overrides)
    micro = rank_micro_batches(cfg, layout, global_batch(cfg, 0), dims.dp_rank)
    engine.forward_backward(micro)  # gradients of the mean loss over the global batch, no step
    grads = {n: full(p.grad) for n, p in unwrap(engine.model).named_parameters()}
    engine.optimizer.zero_grad(set_to_none=True)
    losses, norms = [], []
    for step in range(steps):
        res = engine.train_step(rank_micro_batches(cfg, layout, global_batch(cfg, 0), dims.dp_rank))
        losses.append(res.loss)
        norms.append(res.grad_norm)
    weights = {n: full(p) for n, p in unwrap(engine.model).named_parameters()}
    return {"grads": grads, "losses": losses, "norms": norms, "weights": weights}


def _close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=lambda m: f"{k}: {m}")


def check_against_reference(result: dict, ref: dict) -> None:
    """An `engine_run` result equals `plain_reference` (fp32: gradients 1e-6, weights 1e-5)."""
    import pytest

    _close(result["grads"], ref["grads"], 1e-6)
    assert result["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=1e-6)
    assert result["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    _close(result["weights"], ref["weights"], 1e-5)


def engine_cases(rank: int, world: int, cases: dict[str, list[str]], steps: int = 3) -> dict:
    """Several `engine_run`s in one launch (each launch costs seconds)."""
    return {name: engine_run(rank, world, overrides, steps) for name, overrides in cases.items()}


def plain_reference(overrides: list[str], steps: int = 3) -> dict:
    """The same computation written as plain single-device PyTorch: no mesh, no engine."""
    from titans_pretrain.config import load_config
    from titans_pretrain.models import TitansLM
    from titans_pretrain.train.optim import build_optimizer, build_scheduler
    from titans_pretrain.train.engines import seed_everything

    cfg = load_config(CONFIG, [*ADAM, *overrides])
    seed_everything(cfg.train.seed)
    model = TitansLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    batch = global_batch(cfg, 0)
    model(batch["input_ids"], labels=batch["labels"]).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad(set_to_none=True)
    losses, norms = [], []
    for _ in range(steps):
        loss = model(batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # a held-out batch after training
        held_out = global_batch(cfg, 1)
        val_loss = float(model(held_out["input_ids"], labels=held_out["labels"]).loss)
    return {"grads": grads, "losses": losses, "norms": norms, "weights": weights, "val_loss": val_loss}


def deepspeed_run(rank: int, world: int, overrides: list[str], steps: int = 3) -> dict:
    """Like `engine_run` with the DeepSpeed engine; step 1's gradients are read at the boundary."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from titans_pretrain.config import load_config, resolve_layout
    from titans_pretrain.distributed.mesh import build_mesh
    from titans_pretrain.train.engines import build_engine

    cfg = load_config(CONFIG, ["parallel.engine=deepspeed", *ADAM, *overrides])
    layout = resolve_layout(cfg, world)
    dims = build_mesh(layout, torch.device("cpu"))
    eng = build_engine(cfg, dims, torch.device("cpu"))  # as the trainer (ZeRO-3: partitioned)
    micro = rank_micro_batches(cfg, layout, global_batch(cfg, 0), dims.dp_rank)
    total = 0.0
    for i, mb in enumerate(micro):
        loss = eng._loss(mb)
        eng.engine.backward(loss)
        total += float(loss.detach())
        if i == len(micro) - 1:
            grads = {n: safe_get_full_grad(p).detach().clone()
                     for n, p in eng.engine.module.named_parameters()}
        eng.engine.step()
    eng.scheduler.step()
    from titans_pretrain.train.engines import mean_over_dp

    losses = [float(mean_over_dp(torch.tensor(total / len(micro)), dims))]
    norms = [float(eng.engine.get_global_grad_norm())]
    for _ in range(steps - 1):
        res = eng.train_step(micro)
        losses.append(res.loss)
        norms.append(res.grad_norm)
    params = list(eng.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=cfg.parallel.zero_stage == 3):
        weights = {n: p.detach().clone() for n, p in params}
    return {"grads": grads, "losses": losses, "norms": norms, "weights": weights}


def deepspeed_cases(rank: int, world: int, cases: dict[str, list[str]], steps: int = 3) -> dict:
    return {name: deepspeed_run(rank, world, overrides, steps) for name, overrides in cases.items()}


def _full_state(engine) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(engine.model, engine.optimizer,
                              options=StateDictOptions(full_state_dict=True))
    flat = {f"model.{k}": v.clone() for k, v in msd.items()}
    for name, st in osd["state"].items():
        for k, v in st.items():
            flat[f"optim.{name}.{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
    flat["lr"] = torch.tensor(osd["param_groups"][0]["lr"])
    return flat


def save_after_steps(rank: int, world: int, overrides: list[str], folder: str, steps: int = 2) -> dict:
    cfg, layout, dims, engine = build_engine(world, overrides, seed_offset=world)
    for step in range(steps):
        engine.train_step(rank_micro_batches(cfg, layout, global_batch(cfg, step), dims.dp_rank))
    engine.save(Path(folder))
    return _full_state(engine)


def load_state(rank: int, world: int, overrides: list[str], folder: str) -> dict:
    _, _, _, engine = build_engine(world, overrides, seed_offset=world)
    engine.load(Path(folder))
    return _full_state(engine)
