"""The FLOPs-per-token report: `models/flops.py`'s parts, with the memory's parts summed."""
from __future__ import annotations

from typing import Any

from torch import nn

from titans_pretrain.models.flops import flops_parts


def flops_split(model: nn.Module, cfg: Any, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token: `total`, `dense`, `attention`, `memory` (all memory parts) and each
    `memory_*` part of the formula (forward + backward, i.e. 3x forward)."""
    parts = flops_parts(model, cfg, seq_len)
    memory = sum(v for k, v in parts.items() if k.startswith("memory_"))
    return {"total": sum(parts.values()), "memory": memory, **parts}
