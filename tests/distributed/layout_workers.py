"""Rank functions for the tensor/pipeline-parallel layout tests (importable by spawned ranks)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from trainer_workers import ADAM, build_engine, full, global_batch, rank_micro_batches  # noqa: F401 (ADAM: re-exported)


def _named(engine, what: str) -> dict:
    """Full tensors by checkpoint name of every parameter this rank holds (grads or weights)."""
    out = {}
    for name, p in engine.named_parameters():
        t = p.grad if what == "grads" else p
        if t is not None:
            out[name] = full(t)
    return out


def layout_run(rank: int, world: int, overrides: list[str], steps: int = 2, save_dir: str | None = None) -> dict:
    """Gradients of the first global batch, then `steps` optimizer steps: losses, norms, weights,
    the evaluated loss of a held-out batch (and, with `save_dir`, a DCP checkpoint there and this
    rank's part of the full state)."""
    cfg, layout, dims, engine = build_engine(world, overrides)
    engine.model.train()
    engine.forward_backward(rank_micro_batches(cfg, layout, global_batch(cfg, 0), dims.dp_rank))
    grads = _named(engine, "grads")
    engine.optimizer.zero_grad(set_to_none=True)
    losses, norms = [], []
    for _ in range(steps):
        res = engine.train_step(rank_micro_batches(cfg, layout, global_batch(cfg, 0), dims.dp_rank))
        losses.append(res.loss)
        norms.append(res.grad_norm)
    shapes = {n: tuple((p.to_local() if isinstance(p, DTensor) else p).shape) for n, p in engine.named_parameters()}
    val_loss = engine.evaluate(rank_micro_batches(cfg, layout, global_batch(cfg, 1), dims.dp_rank))
    out = {"grads": grads, "losses": losses, "norms": norms, "weights": _named(engine, "weights"),
           "local_shapes": shapes, "val_loss": val_loss}
    if save_dir is not None:
        from trainer_workers import _full_state

        engine.save(Path(save_dir))
        out["state"] = _full_state(engine)
    return out


def layout_cases(rank: int, world: int, cases: dict[str, list[str]], steps: int = 2,
                 save: dict[str, str] | None = None) -> dict:
    """Several `layout_run`s in one launch; `save` maps a case name to its checkpoint folder."""
    save = save or {}
    return {name: layout_run(rank, world, overrides, steps, save.get(name)) for name, overrides in cases.items()}


def load_full_state(rank: int, world: int, overrides: list[str], folder: str) -> dict:
    """Load a checkpoint of any layout onto this layout; this rank's part of the full state."""
    from trainer_workers import _full_state

    _, _, _, engine = build_engine(world, overrides, seed_offset=world + 7)  # other init: load must overwrite
    engine.load(Path(folder))
    return _full_state(engine)


def _check(result: dict, ref: dict, name: str) -> None:
    """`result` holds this rank's parameters only (a pipeline rank holds its stages)."""
    assert result["grads"].keys() <= ref["grads"].keys()
    for k, g in result["grads"].items():
        torch.testing.assert_close(g, ref["grads"][k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name} grad {k}: {m}")
    assert result["losses"] == pytest.approx(ref["losses"], rel=1e-6), name
    assert result["norms"] == pytest.approx(ref["norms"], rel=1e-5), name
    assert result["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5), name  # engine.evaluate
    for k, w in result["weights"].items():
        torch.testing.assert_close(w, ref["weights"][k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} weight {k}: {m}")


def check_layout(ranks: list[dict], cases: dict[str, list[str]], refs: dict[str, dict]) -> None:
    for name in cases:
        held: set[str] = set()
        for r in ranks:
            _check(r[name], refs[name], name)
            held |= r[name]["grads"].keys()
        assert held == refs[name]["grads"].keys(), f"{name}: parameters held by no rank"


def references(cases: dict[str, list[str]]) -> dict[str, dict]:
    """`plain_reference` (2 steps) for each case, with the case's model and optim overrides."""
    from trainer_workers import plain_reference

    return {name: plain_reference([o for o in ov if o.startswith(("model.", "optim."))], steps=2)
            for name, ov in cases.items()}


def meta_init_cases(rank: int, world: int, cases: dict[str, list[str]]) -> dict:
    """Per case: the full weights this rank holds after a meta-device start (built without drawing,
    sharded, materialised shard by shard), and the weights of an eager start with the same seed."""
    from titans_pretrain.config import load_config, resolve_layout
    from titans_pretrain.distributed.mesh import build_mesh
    from titans_pretrain.models import TitansLM
    from titans_pretrain.train.engines import NativeEngine
    from titans_pretrain.train.engines import seed_everything
    from trainer_workers import CONFIG

    out = {}
    for name, overrides in cases.items():
        cfg = load_config(CONFIG, [*ADAM, *overrides])
        dims = build_mesh(resolve_layout(cfg, world), torch.device("cpu"))
        seed_everything(cfg.train.seed)
        with torch.device("meta"):
            model = TitansLM(cfg.model, init=False)
        engine = NativeEngine(model, cfg, dims, torch.device("cpu"))
        after = torch.rand(4)  # the generator continues as after an eager start
        seed_everything(cfg.train.seed)
        eager = TitansLM(cfg.model)
        out[name] = {"meta": _named(engine, "weights"),
                     "eager": {k: v.detach().clone() for k, v in eager.named_parameters()},
                     "rng_after": (after, torch.rand(4))}
    return out


def start_memory(rank: int, world: int, config: str, overrides: list[str], meta_init: bool) -> dict:
    """Build the trainer's engine for a preset (meta-device start or eager) and report this rank's
    peak resident memory and the bytes of the parameters it holds."""
    from torch.distributed.tensor import DTensor

    from titans_pretrain.config import load_config, resolve_layout
    from titans_pretrain.distributed.mesh import build_mesh
    from titans_pretrain.train.engines import build_engine

    def peak_rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    cfg = load_config(config, [*overrides, f"parallel.meta_init={str(meta_init).lower()}"])
    dims = build_mesh(resolve_layout(cfg, world), torch.device("cpu"))
    before = peak_rss()
    engine = build_engine(cfg, dims, torch.device("cpu"))
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in engine.model.parameters())
    return {"peak_rss": peak_rss(), "before": before, "local_param_bytes": local,
            "model_bytes": engine.module.num_params() * 4 if not meta_init else None}
