"""The memory kernels fit the GPU they are for: compiled for sm_90 on CPU (no GPU needed).

A kernel whose shared memory exceeds the card's per-block limit cannot launch, and ``auto`` mode would
silently run PyTorch instead. The first kernel held a head's whole ``D x E`` state and needed 432 KiB
(forward) and 1056 KiB (backward) at the issue's shape, against the H100's 227 KiB; these tests hold
the tiled kernels to the limit.
"""
from __future__ import annotations

import pytest

from titans_pretrain.models.kernels.resources import SHARED_LIMIT, compile_report

ISSUE_SHAPE = dict(b=64, D=64, E=256)  # chunk 64, 12 heads x 64, expansion 4


@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_issue_shape_fits_h100_shared_memory(which, monkeypatch):
    monkeypatch.delenv("TITANS_KERNEL_BLOCK_E", raising=False)
    monkeypatch.delenv("TITANS_KERNEL_NUM_WARPS", raising=False)
    r = compile_report(which, arch=90, **ISSUE_SHAPE)  # the launch defaults: tile width, warps
    assert r["block_e"] == 16 and r["num_warps"] == 4
    assert 0 < r["shared"] <= SHARED_LIMIT[90], r
    assert r["fits"] and r["registers"] is not None, r


def test_depth1_fits_h100_shared_memory():
    for which in ("fwd", "bwd"):
        r = compile_report(which, arch=90, depth=1, b=64, D=64)
        assert r["fits"], r


def test_wider_tile_does_not_fit():
    """Why the default tile is 16 hidden units: at 32 the backward needs more than the H100 has."""
    r = compile_report("bwd", arch=90, block_e=32, **ISSUE_SHAPE)
    assert r["shared"] > SHARED_LIMIT[90] and not r["fits"], r
