"""AdamW with parameter groups and the learning-rate schedules (warmup + cosine, WSD, constant).

Weight decay pulls weights toward zero; on norm gains, biases and embeddings that only hurts, so
those go to a no-decay group (which categories is `optim.no_decay`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from titans_pretrain.config import OptimConfig

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups (each parameter exactly once)."""
    no_decay_kinds = set(cfg.no_decay)
    unknown = no_decay_kinds - {"norm", "bias", "embedding"}
    if unknown:
        raise ValueError(f"optim.no_decay: unknown kind {sorted(unknown)[0]!r}; use norm, bias, embedding")
    skip: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if ("norm" in no_decay_kinds and _is_norm(module)) or \
               ("embedding" in no_decay_kinds and isinstance(module, nn.Embedding)) or \
               ("bias" in no_decay_kinds and name.endswith("bias")):
                skip.add(id(p))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # foreach=False: one code path on every device and parameter type (DTensor included), so
    # 1-rank and N-rank runs do the same arithmetic.
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, foreach=False)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of `optim.lr` for optimizer step `step` (0-based)."""
    warm = cfg.warmup_steps
    if step < warm:
        return (step + 1) / warm
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: warmup, stable at the peak, then a linear decay over the last `decay_fraction` of steps
    decay_steps = max(1, int(round(total * cfg.decay_fraction)))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's hyperparameters (lr, betas, eps, weight decay, ...), not its params."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def restore_schedule(scheduler, state: dict, settings: list[dict]) -> None:
    """Continue a resumed schedule at the checkpoint's step with this run's settings.

    Loading an optimizer brings back the checkpoint's group hyperparameters and loading a
    scheduler its base lrs, so a changed ``optim.lr``, schedule, ``train.steps`` or weight decay
    would be silently ignored. Here only the step count comes from `state`; `settings` (taken
    from the freshly built optimizer) and this run's lr lambda decide the rest. With an unchanged
    config the result is the checkpoint's, bit for bit (the same ``base * factor(step)``)."""
    groups = scheduler.optimizer.param_groups
    for group, fresh in zip(groups, settings):
        group.update(fresh)
    scheduler.last_epoch, scheduler._step_count = state["last_epoch"], state["_step_count"]
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
