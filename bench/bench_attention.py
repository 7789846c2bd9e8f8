"""Sliding-window attention (MAG/MAL) at long context: banded blocks vs one dense masked call.

Not a test. Counts the attention scores and mask bytes of both forms, then times forward+backward
of ``Attention.sliding`` (banded, the model's path for ``T >= 2 * window``) against the dense form
(one ``T x T`` mask) on the same inputs, and checks that they agree::

    OMP_NUM_THREADS=2 python bench/bench_attention.py                  # CPU: T 2K-8K, window 512
    python bench/bench_attention.py --device cuda --T 4096 16384 32768 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from titans_pretrain.models.attention import Attention, sliding_window_mask  # noqa: E402


def dense_sliding(attn: Attention, x: torch.Tensor, window: int) -> torch.Tensor:
    """The form used before banding: every query against every key under a ``T x T`` mask."""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device)
    q = attn._rope(attn._heads(attn.q_proj(x)), pos)
    k = attn._rope(attn._heads(attn.k_proj(x)), pos)
    v = attn._heads(attn.v_proj(x))
    return attn._attend(q, k, v, sliding_window_mask(pos, pos, window))


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x).float().square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--persistent", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    dtype, w = getattr(torch, a.dtype), a.window
    torch.manual_seed(0)
    attn = Attention(a.d_model, a.heads, a.d_model // a.heads, n_persistent=a.persistent).to(a.device, dtype)
    print(f"# {a.device} {a.dtype}, d_model {a.d_model}, {a.heads} heads, window {w}, batch {a.batch}, "
          f"{a.persistent} persistent, forward+backward, best of {a.repeats}, torch {torch.__version__}")
    print("| T | scores dense | scores banded | mask dense | mask banded | dense ms | banded ms | speedup | max abs diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for T in a.T:
        x = torch.randn(a.batch, T, a.d_model, device=a.device, dtype=dtype, requires_grad=True)
        n = -(-T // w)
        scores = (T * (T + a.persistent), n * w * (2 * w - 1 + a.persistent))  # per sequence and head
        masks = (T * (T + a.persistent), a.batch * n * w * (2 * w - 1 + a.persistent))  # bytes (bool)
        with torch.no_grad():
            diff = (attn.sliding(x, w)[0] - dense_sliding(attn, x, w)).abs().max().item()
        dense = timed(lambda t: dense_sliding(attn, t, w), x, a.repeats)
        banded = timed(lambda t: attn.sliding(t, w)[0], x, a.repeats)
        print(f"| {T} | {scores[0] / 1e6:.1f}M | {scores[1] / 1e6:.1f}M | {masks[0] / 2**20:.1f} MiB | "
              f"{masks[1] / 2**20:.1f} MiB | {dense * 1e3:.1f} | {banded * 1e3:.1f} | {dense / banded:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
