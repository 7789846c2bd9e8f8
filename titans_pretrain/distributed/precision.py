"""Mixed precision: bf16 compute under autocast, fp32 parameters and optimizer states.

Shared by both engines and the pipeline stages, so every layout computes in the same precision."""
from __future__ import annotations

import contextlib

import torch

from titans_pretrain.config import RunConfig


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    mp = cfg.parallel.mixed_precision
    if mp == "bf16" and device.type != "cuda":
        return True  # allowed on CPU when asked for explicitly (slow, for tests)
    return mp == "bf16" or (mp == "auto" and device.type == "cuda")


def autocast(cfg: RunConfig, device: torch.device):
    """bf16 autocast for compute; parameters and optimizer states stay fp32 (master weights)."""
    if use_bf16(cfg, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
