"""Attention for the Titans blocks: persistent tokens, RoPE, sliding-window and MAC segment masks.

One module, two ways to call it:

* :meth:`Attention.sliding` (MAG, MAL): causal attention over a window of the last ``window`` tokens
  (the query itself included), with an optional :class:`KVCache` that carries the last
  ``window - 1`` keys and values across calls, so streaming costs O(window) memory.
* :meth:`Attention.segment` (MAC, docs/method.md §4): queries are the tokens of one segment, keys
  and values are ``[persistent | h | segment]`` where ``h`` is the memory's read for the segment;
  query ``i`` sees every persistent token, ``h_j`` and ``x_j`` for ``j <= i``, nothing outside.

Persistent tokens (§3.3) are learned, input-independent vectors in model space, projected by the
layer's own key/value projections, always visible and never rotated (they have no position).
Masks are explicit booleans handed to ``F.scaled_dot_product_attention`` (``True`` = may attend),
which runs on CPU and GPU alike. A long sequence under a sliding window is attended block by block
(:func:`banded_blocks`): each block of ``window`` queries sees only its ``2 * window - 1`` keys, so
the cost is ``O(T * window)`` instead of the ``O(T^2)`` scores and ``T x T`` mask of one dense call
(at T = 32K, window 512: 32x fewer scores and a 32 MB mask instead of 1 GB).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "KVCache",
    "apply_rope",
    "banded_blocks",
    "mac_segment_mask",
    "rope_cos_sin",
    "sliding_window_mask",
]


# ------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``(T, head_dim // 2)`` for integer ``positions`` (computed in fp64 for exactness)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, H, T, D)`` pairwise (first half with second half of the head dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ------------------------------------------------------------------------------------------ masks
def sliding_window_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """``(Tq, Tk)`` bool: query at ``q_pos[i]`` sees key at ``k_pos[j]`` iff
    ``q_pos[i] - window < k_pos[j] <= q_pos[i]`` (``window=None``: plain causal)."""
    diff = q_pos[:, None] - k_pos[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


def banded_blocks(q: Tensor, k: Tensor, v: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Regroup a sliding-window problem into independent blocks of ``window`` queries.

    ``q`` ``(B, H, T, D)``; ``k``, ``v`` ``(B, H, off + T, D)`` whose first ``off <= window - 1``
    entries are cached keys before the first query. Keys are padded on the left to ``window - 1``
    slots before query 0 (and on the right to whole blocks); block ``j`` then needs exactly the
    padded keys ``[j * window, (j + 2) * window - 1)``. Returns ``(q, k, v, mask)`` of shapes
    ``(B * n, H, window, D)``, ``(B * n, H, 2 * window - 1, D)`` twice and ``(B * n, window,
    2 * window - 1)`` (``n`` blocks, batch-major); the caller keeps the first ``T`` outputs."""
    B, H, T, D = q.shape
    off = k.shape[2] - T
    if not 0 <= off < window:
        raise ValueError(f"banded attention needs 0..{window - 1} cached keys, got {off}")
    n = -(-T // window)
    lead, tail = window - 1 - off, n * window - T
    span = 2 * window - 1

    def blocks(x: Tensor) -> Tensor:  # (B, H, L, D) -> (B * n, H, span, D), overlapping views copied once
        x = F.pad(x, (0, 0, lead, tail)).unfold(2, span, window)  # (B, H, n, D, span)
        return x.permute(0, 2, 1, 4, 3).reshape(B * n, H, span, D)

    qb = F.pad(q, (0, 0, 0, tail)).unflatten(2, (n, window)).transpose(1, 2).reshape(B * n, H, window, D)
    i = torch.arange(window, device=q.device)[:, None]
    slot = torch.arange(span, device=q.device)[None, :]
    band = (slot >= i) & (slot < i + window)  # query i of a block sees slots i .. i + window - 1
    padded = torch.arange(n, device=q.device)[:, None, None] * window + slot  # (n, 1, span)
    mask = (band & (padded >= lead)).repeat(B, 1, 1)  # the left padding is not a key
    return qb, blocks(k), blocks(v), mask


def mac_segment_mask(n_tokens: int, n_context: int | None, device=None) -> Tensor:
    """``(n, n_ctx + n)`` bool for keys ``[h | x]`` of one MAC segment (persistent columns excluded):
    query ``i`` sees ``h_j`` and ``x_j`` for ``j <= i``. ``n_context=None``: no ``h`` (memory off)."""
    causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=device).tril()
    if n_context is None:
        return causal
    if n_context != n_tokens:
        raise ValueError(f"MAC reads one memory token per segment token: got {n_context} reads for {n_tokens} tokens")
    return torch.cat((causal, causal), dim=1)


@dataclass
class KVCache:
    """The sliding-window state of one attention layer: rotated keys and values of the last
    ``<= window - 1`` tokens (``(B, H, L, D)``) and ``pos``, the absolute position of the next token."""

    k: Tensor
    v: Tensor
    pos: int


# -------------------------------------------------------------------------------------- the module
class Attention(nn.Module):
    """Multi-head attention with ``n_persistent`` learned tokens and RoPE on the input tokens."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, n_persistent: int = 0,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_theta = n_heads, head_dim, rope_theta
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.persistent = nn.Parameter(torch.zeros(n_persistent, d_model)) if n_persistent > 0 else None

    # -- helpers
    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        return apply_rope(x, cos, sin)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Prepend the persistent keys/values (visible to every query) and run SDPA."""
        if self.persistent is not None:
            B = q.shape[0]
            p = self.persistent.to(q.dtype)
            pk = self._heads(self.k_proj(p)[None]).expand(B, -1, -1, -1)
            pv = self._heads(self.v_proj(p)[None]).expand(B, -1, -1, -1)
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
            mask = torch.cat((mask.new_ones(*mask.shape[:-1], pk.shape[2]), mask), dim=-1)
        if mask.dim() == 3:  # one mask per batch row (banded blocks): broadcast over heads
            mask = mask[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    # -- MAG / MAL
    def sliding(self, x: Tensor, window: int | None, cache: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """Sliding-window causal attention over ``x`` ``(B, T, d)`` following ``cache``.

        Returns the output and the cache after ``x`` (the last ``window - 1`` keys/values; all of
        them when ``window`` is None, which then grows with the sequence)."""
        T = x.shape[1]
        start = 0 if cache is None else cache.pos
        pos = torch.arange(start, start + T, device=x.device)
        q = self._rope(self._heads(self.q_proj(x)), pos)
        k = self._rope(self._heads(self.k_proj(x)), pos)
        v = self._heads(self.v_proj(x))
        if cache is not None and cache.k.shape[2] > 0:
            k, v = torch.cat((cache.k.to(k.dtype), k), dim=2), torch.cat((cache.v.to(v.dtype), v), dim=2)
        if window is not None and T >= 2 * window:
            B = x.shape[0]
            y = self._attend(*banded_blocks(q, k, v, window))  # (B * n, window, d)
            y = y.reshape(B, -1, y.shape[-1])[:, :T]
        else:
            k_pos = torch.arange(start + T - k.shape[2], start + T, device=x.device)
            y = self._attend(q, k, v, sliding_window_mask(pos, k_pos, window))
        keep = k.shape[2] if window is None else min(window - 1, k.shape[2])
        new_cache = KVCache(k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:], start + T)
        return y, new_cache

    # -- MAC
    def segment(self, x: Tensor, context: Tensor | None, segment_len: int) -> Tensor:
        """Attention of one MAC segment ``x`` ``(B, n, d)``, ``n <= segment_len``, over
        ``[persistent | context | x]`` (``context``: the memory reads ``h``, ``(B, n, d)``, or None).

        RoPE positions are those of the sequence ``[h | x]`` of a full segment: ``h_j`` at ``j`` and
        ``x_j`` at ``segment_len + j``, so a partial segment (streaming) sees exactly what it
        will see once complete."""
        n = x.shape[1]
        if n > segment_len:
            raise ValueError(f"segment of {n} tokens is longer than segment_len={segment_len}")
        x_pos = torch.arange(segment_len, segment_len + n, device=x.device)
        q = self._rope(self._heads(self.q_proj(x)), x_pos)
        k = self._rope(self._heads(self.k_proj(x)), x_pos)
        v = self._heads(self.v_proj(x))
        if context is not None:
            h_pos = torch.arange(n, device=x.device)
            k = torch.cat((self._rope(self._heads(self.k_proj(context)), h_pos), k), dim=2)
            v = torch.cat((self._heads(self.v_proj(context)), v), dim=2)
        mask = mac_segment_mask(n, None if context is None else context.shape[1], device=x.device)
        return self._attend(q, k, v, mask)
