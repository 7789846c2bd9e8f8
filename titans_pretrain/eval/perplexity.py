"""Perplexity by context length and the per-position loss curve, on held-out shards.

Validation samples are consecutive pieces of the packed token stream (``prepare`` cuts it into
rows in order), so concatenating them rebuilds long stretches of real text longer than the
training length. Each length ``L`` has its own streams: the first ``max_streams`` pieces of
``L + 1`` tokens of the split, evaluated by streaming, and the perplexity "at context length L" is
``exp(mean loss over all L positions)``. So the number at ``L`` depends only on ``(L, max_streams,
split)``, never on which other lengths are asked for in the same run (shared streams cut at the
longest length would change with it), and results of separate runs can be merged. The per-position curve
(mean loss in log-spaced position bins) shows whether loss keeps falling past the attention span,
which is what a working long-term memory buys.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from titans_pretrain.data.manifest import Manifest
from titans_pretrain.data.shards import read_shard
from titans_pretrain.eval.streaming import token_losses

__all__ = ["PerplexityResult", "attention_span", "evaluate_perplexity", "position_bins", "val_streams"]


def attention_span(config) -> int:
    """How far back attention alone can see: a MAC segment, the MAG/MAL window, nothing for LMM
    (and with the memory disabled, that is how far back the model can see at all)."""
    return {"mac": config.segment_len, "mag": config.window, "mal": config.window, "lmm": 0}[config.variant]


def val_streams(manifest: Manifest, length: int, max_streams: int, split: str = "val") -> torch.Tensor:
    """``(n, length + 1)`` token ids from ``split``'s shards in order (n <= max_streams)."""
    needed = max_streams * (length + 1)
    parts, have = [], 0
    for shard in manifest.shards(split):
        rows = read_shard(manifest.root / shard.file, sample_len=manifest.sample_len,
                          dtype=np.dtype(manifest.dtype), expected_samples=shard.samples,
                          expected_sha256=shard.sha256)
        parts.append(rows.reshape(-1).astype(np.int64))
        have += parts[-1].size
        if have >= needed:
            break
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = min(max_streams, flat.size // (length + 1))
    if n == 0:
        raise ValueError(f"split {split!r} of {manifest.path} holds {flat.size} tokens, fewer than one stream "
                         f"of {length + 1}: use shorter --ppl-lengths or prepare a larger validation split")
    return torch.from_numpy(flat[:n * (length + 1)].reshape(n, length + 1))


def position_bins(length: int, per_octave: int = 2) -> list[tuple[int, int]]:
    """Log-spaced ``[start, end)`` bins covering positions ``0 .. length - 1``."""
    edges = {0, length}
    k = 1.0
    while k < length:
        edges.add(int(round(k)))
        k *= 2 ** (1 / per_octave)
    edges = sorted(e for e in edges if e <= length)
    return list(zip(edges[:-1], edges[1:]))


@dataclass
class PerplexityResult:
    lengths: list[int]
    perplexity: list[float]
    mean_loss: list[float]
    bins: list[tuple[int, int]]  # position bins of the curve (the longest length's streams)
    bin_loss: list[float]
    streams: int  # streams of the curve
    streams_by_length: list[int]
    attention_span: int
    piece_len: int
    first_nonfinite: int | None  # first position whose loss is NaN/inf in any stream (state overflow)

    def to_json(self) -> dict:
        return asdict(self)


def evaluate_perplexity(model, manifest: Manifest, lengths: list[int], *, max_streams: int = 8,
                        piece_len: int, batch_size: int = 4, split: str = "val") -> PerplexityResult:
    """Perplexity at each length from that length's own streams; the curve from the longest's."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive token counts, got {lengths}")
    lengths = sorted(set(lengths))
    mean, counts, per_position, first_bad = [], [], None, None
    for L in lengths:
        streams = val_streams(manifest, L, max_streams, split)
        losses = torch.cat([token_losses(model, streams[i:i + batch_size], piece_len)[0]
                            for i in range(0, streams.shape[0], batch_size)])
        per_position = losses.double().mean(dim=0)
        bad = (~torch.isfinite(per_position)).nonzero()
        if bad.numel() and (first_bad is None or int(bad[0]) < first_bad):
            first_bad = int(bad[0])
        mean.append(per_position.mean().item())
        counts.append(streams.shape[0])
    bins = position_bins(lengths[-1])
    return PerplexityResult(
        lengths=lengths, mean_loss=mean, perplexity=[math.exp(m) for m in mean], bins=bins,
        bin_loss=[per_position[a:b].mean().item() for a, b in bins], streams=counts[-1],
        streams_by_length=counts, attention_span=attention_span(model.config), piece_len=piece_len,
        first_nonfinite=first_bad)
