"""RMSNorm over the last dimension, computed in fp32 (fp64 stays fp64; bf16 statistics are too coarse)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm", "rms_norm"]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / rms(x) * weight`` over the last dim; statistics in fp32, result in ``x.dtype``."""
    xf = x if x.dtype == torch.float64 else x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(xf.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale of shape ``shape``.

    ``shape=(d,)`` is the usual norm; ``shape=(H, 1, D)`` normalises each head of a ``(B, H, T, D)``
    tensor on its own (per-head norms keep tensor parallelism over heads free of communication)."""

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
