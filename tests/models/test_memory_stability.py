"""Stress: the memory at every shipped preset's per-layer shape, driven adversarially for 64K tokens.

Every gate at its worst (theta at theta_max, eta at eta_max, no forgetting), keys that all point into
one orthant (the layer's l2-normalised SiLU outputs do) so that a chunk's surprises add up, and
values far larger than the memory's outputs. With the default surprise clip the state stays bounded:
finite, its momentum under the clip's hard bound, and its prediction of each next piece's values
never worse than predicting zero (with values 100x the memory's scale it must grow to fit them, at
the clip's bounded rate). With the bare rule (``surprise_clip=0``) it blows up within the first few
thousand tokens, as the paper-shape presets did in training (docs/training.md, "Memory stability").
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from titans_pretrain.config import load_config
from titans_pretrain.models.memory_ops import init_state, memory_chunked, memory_read

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 65536
PIECE = 4096  # tokens per call, state carried between calls (as streaming does)


def _preset_shapes():
    """(head dim, hidden width, chunk, theta_max, eta_max, surprise_clip) of every paper-scale preset."""
    shapes = set()
    for path in sorted(p for p in (ROOT / "configs").glob("*.yaml") if re.search(r"_\d[\d.]*[mb]\.yaml$", p.name)):
        m = load_config(path).model
        D = m.resolved_head_dim
        shapes.add((D, m.memory_expansion * D, m.chunk_size, m.theta_max, m.eta_max, m.surprise_clip))
    return sorted(shapes)


def _drive(D, E, chunk, theta_max, eta_max, clip, value_scale, heads=2, seed=0):
    """Per piece: max weight norm and max momentum norm after it, and the error of the memory as it
    stood before the piece on the piece's pairs, relative to predicting zero (stops once the weights
    are non-finite or > 1e8)."""
    g = torch.Generator().manual_seed(seed)
    m0 = [torch.randn(heads, D, E, generator=g) / math.sqrt(D), torch.randn(heads, E, D, generator=g) / math.sqrt(E)]
    state = init_state(m0, 1)
    gates = [torch.full((1, heads, PIECE), x) for x in (theta_max, eta_max, 0.0)]
    history = []
    with torch.no_grad():
        for _ in range(TOKENS // PIECE):
            q, k = (F.normalize(F.silu(torch.randn(1, heads, PIECE, D, generator=g)), dim=-1) for _ in range(2))
            v = F.silu(value_scale * torch.randn(1, heads, PIECE, D, generator=g))
            error = ((memory_read(k, state.weights) - v) ** 2).sum() / (v ** 2).sum()
            _, state = memory_chunked(q, k, v, *gates, state, chunk_size=chunk, surprise_clip=clip)
            w = max(x.norm(dim=(-2, -1)).max().item() for x in state.weights)
            s = max(x.norm(dim=(-2, -1)).max().item() for x in state.momentum)
            history.append((w, s, error.item()))
            if not w < 1e8:
                break
    return max(x.norm(dim=(-2, -1)).max().item() for x in m0), history


def test_every_preset_is_covered():
    shapes = _preset_shapes()
    assert {(D, E) for D, E, *_ in shapes} >= {(64, 256), (96, 384), (128, 512)}
    assert all(clip > 0 for *_, clip in shapes), "a preset runs the bare rule"


@pytest.mark.parametrize("value_scale", [6.0, 100.0])
@pytest.mark.parametrize("shape", _preset_shapes(), ids=lambda s: f"D{s[0]}_E{s[1]}_chunk{s[2]}")
def test_default_clip_keeps_the_state_bounded(shape, value_scale):
    D, E, chunk, theta_max, eta_max, clip = shape
    start, history = _drive(D, E, chunk, theta_max, eta_max, clip, value_scale)
    assert len(history) == TOKENS // PIECE
    weights, momenta, errors = zip(*history)
    assert all(math.isfinite(w) for w in weights)
    # the hard bound: a clipped surprise moves the momentum by at most theta_max * clip per token
    assert max(momenta) <= theta_max * clip / (1 - eta_max) * (1 + 1e-5), momenta
    assert max(errors[1:]) < 1.0, errors  # once written, it tracks its targets: no running away
    if value_scale <= 6:
        assert max(weights) < 3 * start, (start, weights)


@pytest.mark.parametrize("shape", _preset_shapes(), ids=lambda s: f"D{s[0]}_E{s[1]}_chunk{s[2]}")
def test_bare_rule_explodes_under_the_same_drive(shape):
    D, E, chunk, theta_max, eta_max, _ = shape
    start, history = _drive(D, E, chunk, theta_max, eta_max, 0.0, value_scale=6.0)
    assert not history[0][0] < 1e8, (start, history)  # non-finite or astronomically large within 4K tokens
