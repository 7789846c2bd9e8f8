"""Activation checkpointing frees the memory layer too: the bytes held after a forward grow with the
number of layers by one block input per layer, not by the memory core's saved states.

Each measurement runs in a fresh process (``python tests/distributed/test_activation_memory.py``
is the worker) with glibc's mmap threshold fixed, so that every large tensor is its own mapping and
the resident set size rises and falls with the live tensors: the growth of RSS across the forward
is what the forward left held for backward.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BATCH, SEQ, D_MODEL = 2, 1024, 256


def _held(variant: str, n_layers: int, checkpointing: bool) -> float:
    """MiB held between forward and backward (the worker's RSS growth across the forward)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, variant, str(n_layers), str(int(checkpointing))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["held_mib"]


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_checkpointing_holds_one_block_input_per_layer(variant):
    block_input = BATCH * SEQ * D_MODEL * 4 / 2**20  # MiB, fp32
    with_ac = {n: _held(variant, n, True) for n in (2, 8)}
    without = {n: _held(variant, n, False) for n in (2, 4)}
    per_layer_ac = (with_ac[8] - with_ac[2]) / 6
    per_layer = (without[4] - without[2]) / 2
    # a block input (2 MiB here) per layer, give or take allocator pages (measured 1.05x LMM, 1.4x MAC)
    assert 0.75 * block_input < per_layer_ac < 1.6 * block_input, (with_ac, block_input)
    assert per_layer > 8 * per_layer_ac, (without, with_ac)  # the memory layer's internals, freed by AC


def _worker(variant: str, n_layers: int, checkpointing: bool) -> None:
    import torch

    from titans_pretrain.distributed.parallelize import apply_activation_checkpointing
    from titans_pretrain.models import TitansConfig, TitansLM

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    torch.manual_seed(0)
    cfg = TitansConfig(variant=variant, vocab_size=256, d_model=D_MODEL, n_layers=n_layers, n_heads=4,
                       chunk_size=16, segment_len=256, window=256)
    model = TitansLM(cfg)
    if checkpointing:
        apply_activation_checkpointing(model)
    ids = torch.randint(0, 256, (BATCH, SEQ))
    model(ids[:, :64], labels=ids[:, :64]).loss.backward()  # first-call allocations out of the way
    model.zero_grad(set_to_none=False)
    before = rss()
    loss = model(ids, labels=ids).loss
    held = rss() - before
    loss.backward()
    print(json.dumps({"held_mib": held / 2**20}))


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])))
