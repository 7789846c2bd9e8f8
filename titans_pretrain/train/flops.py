"""Training FLOPs per token and MFU.

The formula (forward + backward = 3x forward; a multiply-add = 2 FLOPs), per token:

    flops_per_token = 6 * N_matmul                                  dense weights
                    + 3 * n_layers * attn_fwd                        attention scores + values
                    + 3 * n_layers * n_memory_passes * mem_fwd       the memory's inner loop

* `N_matmul`: the weights of every `nn.Linear` (projections, gates, SwiGLU, LM head even when
  tied). The memory's learned initial weights M_0 are not in it (used inside the inner loop).
* `attn_fwd = 4 * H * d_h * ctx`: QK^T and PV, each 2 * H * d_h per attended key, with `ctx` the
  mean number of keys a query attends (causal): MAC `n_p + 2 * (C + 1) / 2` (persistent tokens, the
  segment's memory read-outs h and the segment itself, both causal), MAG/MAL
  `n_p + min(w, T)` minus the causal triangle, LMM 0.
* `mem_fwd` per head, for each memory layer `a -> c` (D -> E -> ... -> D, chunk size b), the dual form
  of §3.2 of the method: key-path forward at M_0 (2ac), inner backward of the squared error (2ac),
  query reads through W_0 and S_0 (4ac), the chunk-end state updates of M and S (4ac), and the
  causal b x b coefficient products `tril(A' A^T)` and `(G * .) Delta` (b(a + c) per token on average):
  `12ac + b(a + c)`. MAC runs the memory twice per layer (read h, then write y and read it back),
  so n_memory_passes is 2 for MAC and 1 otherwise. Gate and projection matmuls are in N_matmul.

An estimate by construction (elementwise work, norms and softmax are not counted, as in the usual
6N accounting); it lets MFU compare runs of the same model honestly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Dense bf16 peak FLOP/s per device (no sparsity), matched against the device name.
DEVICE_PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; PCIe is lower (756e12), matched below first
    "H100 PCIE": 756e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "MI300X": 1307e12,
}


def device_peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU, unlisted GPU): MFU is then null."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key in sorted(DEVICE_PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return DEVICE_PEAK_FLOPS[key]
    return None


def matmul_params(model: nn.Module) -> int:
    """Weights of every `nn.Linear` (the LM head included, tied or not): the per-token matmuls.
    Embedding lookups, depthwise convolutions, persistent tokens and M_0 are not matmuls."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def attention_context(cfg: Any, seq_len: int) -> float:
    variant = cfg.variant
    n_p = getattr(cfg, "n_persistent", 0) or 0
    if variant == "lmm":
        return 0.0
    if variant == "mac":
        c = min(cfg.segment_len or seq_len, seq_len)
        return n_p + (c + 1)  # (c+1)/2 read-outs + (c+1)/2 segment tokens
    w = min(cfg.window or seq_len, seq_len)
    # mean over positions t of min(t + 1, w)
    mean = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
    return n_p + mean


def memory_dims(cfg: Any) -> list[tuple[int, int]]:
    d = cfg.head_dim or cfg.d_model // cfg.n_heads
    depth = cfg.memory_depth
    if depth <= 1:
        return [(d, d)]
    e = int(d * cfg.memory_expansion)
    return [(d, e)] + [(e, e)] * (depth - 2) + [(e, d)]


def memory_forward_flops(cfg: Any) -> float:
    b = cfg.chunk_size
    per_head = sum(12 * a * c + b * (a + c) for a, c in memory_dims(cfg))
    return cfg.n_heads * per_head


def flops_per_token(model: nn.Module, cfg: Any, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token; see the module docstring for the formula."""
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    attn = 4 * cfg.n_heads * head_dim * attention_context(cfg, seq_len)
    use_memory = getattr(cfg, "use_memory", True) or cfg.variant == "lmm"
    passes = (2 if cfg.variant == "mac" else 1) if use_memory else 0
    mem = memory_forward_flops(cfg) * passes
    return 6 * matmul_params(model) + 3 * cfg.n_layers * (attn + mem)


def mfu(flops_token: float, tokens_per_s: float, n_devices: int, peak: float | None) -> float | None:
    if peak is None or tokens_per_s <= 0:
        return None
    return flops_token * tokens_per_s / (peak * n_devices)
