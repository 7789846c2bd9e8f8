"""The memory kernels fit the GPU they are for: compiled for sm_90 on CPU (no GPU needed).

A kernel whose shared memory exceeds the card's per-block limit cannot launch, and ``auto`` mode would
silently run PyTorch instead. The first kernel held a head's whole ``D x E`` state and needed 432 KiB
(forward) and 1056 KiB (backward) at the 170M shape, against the H100's 227 KiB; the first tiled
backward needed 368 KiB at head dimension 128 (the 760M presets' 96, padded). These tests hold every
shipped preset's memory shape (configs/*_<size>{m,b}.yaml) to the limit, forward and backward, with the
surprise clip compiled in when the preset turns it on.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from titans_pretrain.config import load_config
from titans_pretrain.models import kernels
from titans_pretrain.models.kernels.resources import SHARED_LIMIT, compile_report

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")
                 if re.search(r"_\d[\d.]*[mb]\.yaml$", p.name))  # mac_170m ... mac_7b


def _preset_shapes() -> dict:
    """``(chunk, D, E, depth, activation, clip) -> [preset names]`` over the shipped presets."""
    shapes: dict = {}
    for path in CONFIGS:
        m = load_config(path).model
        D = m.resolved_head_dim
        key = (m.chunk_size, D, m.memory_expansion * D, m.memory_depth, m.memory_activation, m.surprise_clip > 0)
        shapes.setdefault(key, []).append(path.stem)
    return shapes


SHAPES = _preset_shapes()


def test_presets_found():
    assert len(CONFIGS) >= 12, CONFIGS
    assert {(64, 64, 256), (64, 96, 384), (64, 128, 512)} <= {key[:3] for key in SHAPES}, SHAPES


@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("shape", sorted(SHAPES), ids=lambda s: "b{}_D{}_E{}_depth{}_{}_clip{}".format(*s))
def test_preset_shape_fits_h100_shared_memory(shape, which, monkeypatch):
    """Every preset's memory runs the kernel (supported, so ``auto`` picks it on CUDA) and its kernel
    fits an H100's shared memory at the launch defaults (tile width, warps)."""
    b, D, E, depth, activation, clip = shape
    dims = [("D", D)] + [("E", E)] * (depth - 1) + [("D_out", D)]
    assert kernels.unsupported_reason(depth, activation, torch.float32, b, dims) is None, SHAPES[shape]
    monkeypatch.delenv("TITANS_KERNEL_BLOCK_E", raising=False)
    monkeypatch.delenv("TITANS_KERNEL_NUM_WARPS", raising=False)
    r = compile_report(which, arch=90, b=b, D=D, E=E, depth=depth, activation=activation, clip=clip)
    assert r["num_warps"] == 4 and (depth == 1 or r["block_e"] == 16), r
    assert 0 < r["shared"] <= SHARED_LIMIT[90], (SHAPES[shape], r)
    assert r["fits"] and r["registers"] is not None, r


def test_depth1_fits_h100_shared_memory():
    for which in ("fwd", "bwd"):
        r = compile_report(which, arch=90, depth=1, b=64, D=64)
        assert r["fits"], r


def test_wider_tile_spills_more():
    """Why the default tile is 16 hidden units: the backward at 32 also fits now (139 KiB at the 170M
    shape, 224 KiB at the 760M one), but spills more registers per thread."""
    shape = dict(b=64, D=64, E=256)
    wide = compile_report("bwd", arch=90, block_e=32, **shape)
    default = compile_report("bwd", arch=90, block_e=16, **shape)
    assert wide["spill_stores"] > default["spill_stores"], (wide, default)
    assert wide["shared"] > default["shared"], (wide, default)
