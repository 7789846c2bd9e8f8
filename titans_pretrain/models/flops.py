"""Training FLOPs per token and MFU.

The formula (forward + backward = 3x forward; a multiply-add = 2 FLOPs), per token, as parts
(:func:`flops_parts`; :func:`flops_per_token` is their sum):

    dense                 6 * N_matmul                                   every nn.Linear
    attention             3 * n_layers * 4 * H * d_h * ctx               QK^T and PV
    memory_*              3 * n_layers * H * (terms below)               the memory's inner loop
    memory_context_read   3 * n_layers * (MAC only) the pre-segment read

* `N_matmul`: the weights of every `nn.Linear` (projections, gates, SwiGLU, LM head even when
  tied). The memory's learned initial weights M_0 are not in it (used inside the inner loop).
* `ctx` is the mean number of keys a query attends (causal): MAC `n_p + 2 * (C + 1) / 2`
  (persistent tokens, the segment's memory read-outs h and the segment itself, both causal),
  MAG/MAL `n_p + mean_t min(t + 1, w)`, LMM 0. Useful work: masked-out scores are not counted.
* The memory, per head and token, for each memory layer `a -> c` (D -> E -> ... -> D, chunk b), what
  `memory_chunked` executes (checked against `torch.utils.flop_counter` in tests/profile):
  `memory_key_forward` 2ac; `memory_inner_backward` 2ac for every layer but the first (the error is
  propagated down to it, never below); `memory_read` 4ac (through W_0 and S_0) + 2b(a + c) (the
  full b x b products `A' A^T` and `(G * .) Delta`); `memory_state_update` 4ac (M and S at the chunk
  end); `memory_coefficients` 2b^2 + 2b once per head (`G = Bratio @ N`, `f = Bratio @ m`).
* MAC reads the memory once more per layer before each segment (`h = M(q(x))`): q projection,
  output gate and output projection again (3 * 2 * d * H * d_h) and the MLP forward (2ac per layer
  and head): `memory_context_read`.

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


def memory_forward_terms(cfg: Any) -> dict[str, float]:
    """Forward FLOPs per token of one write-and-read pass of the memory (all heads), by part."""
    b, H, dims = cfg.chunk_size, cfg.n_heads, memory_dims(cfg)
    return {
        "memory_key_forward": H * sum(2.0 * a * c for a, c in dims),
        "memory_inner_backward": H * sum(2.0 * a * c for a, c in dims[1:]),
        "memory_read": H * sum(4.0 * a * c + 2.0 * b * (a + c) for a, c in dims),
        "memory_state_update": H * sum(4.0 * a * c for a, c in dims),
        "memory_coefficients": H * (2.0 * b * b + 2.0 * b),
    }


def memory_forward_flops(cfg: Any) -> float:
    return sum(memory_forward_terms(cfg).values())


def _uses_memory(cfg: Any) -> bool:
    return bool(getattr(cfg, "use_memory", True)) or cfg.variant == "lmm"


def flops_parts(model: nn.Module, cfg: Any, seq_len: int) -> dict[str, float]:
    """Training FLOPs (forward + backward) per token, by part; see the module docstring."""
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    scale = 3.0 * cfg.n_layers
    parts = {
        "dense": 6.0 * matmul_params(model),
        "attention": scale * 4 * cfg.n_heads * head_dim * attention_context(cfg, seq_len),
    }
    memory_on = _uses_memory(cfg)
    for name, value in memory_forward_terms(cfg).items():
        parts[name] = scale * value if memory_on else 0.0
    context = 0.0
    if cfg.variant == "mac" and memory_on:
        inner = cfg.n_heads * head_dim
        context = 3 * 2.0 * cfg.d_model * inner + cfg.n_heads * sum(2.0 * a * c for a, c in memory_dims(cfg))
    parts["memory_context_read"] = scale * context
    return parts


def flops_per_token(model: nn.Module, cfg: Any, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token; see the module docstring for the formula."""
    return sum(flops_parts(model, cfg, seq_len).values())


def mfu(flops_token: float, tokens_per_s: float, n_devices: int, peak: float | None) -> float | None:
    if peak is None or tokens_per_s <= 0:
        return None
    return flops_token * tokens_per_s / (peak * n_devices)
