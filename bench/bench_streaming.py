"""Stream 1M+ tokens through a small Titans model and show that memory stays flat.

Feeds uniform random token ids piece by piece through `TitansLM`'s streaming state (the same path
as `titans-pretrain eval --task streaming`) and prints, at several lengths: tokens/s, current and
peak RSS, CUDA peak allocation (on a GPU) and the size of the streaming state. A model whose memory
grew with the sequence would show peak RSS (or CUDA peak) rising with the token count.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_streaming.py --tokens 1048576
    python bench/bench_streaming.py --device cuda --tokens 2097152 --d-model 512 --n-layers 8

Results go to stdout and, with --json, to a JSON file (see bench/RESULTS.md for recorded runs).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict

import torch

from titans_pretrain.eval.streaming import stream_benchmark
from titans_pretrain.models import TitansConfig, TitansLM


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="mac", choices=["mac", "mag", "mal", "lmm"])
    p.add_argument("--tokens", type=int, default=1 << 20, help="tokens per sequence to stream")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--piece-len", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--segment-len", type=int, default=256, help="MAC segment (attention span)")
    p.add_argument("--window", type=int, default=256, help="MAG/MAL sliding window")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--points", type=int, default=8, help="measurements, at tokens * k / points")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    torch.manual_seed(0)
    cfg = TitansConfig(variant=a.variant, vocab_size=a.vocab_size, d_model=a.d_model, n_layers=a.n_layers,
                       n_heads=a.n_heads, segment_len=a.segment_len, window=a.window, chunk_size=a.chunk_size)
    model = TitansLM(cfg).to(device).eval()
    if a.dtype == "bf16":
        model = model.to(torch.bfloat16)
    piece = max(cfg.unit, a.piece_len // cfg.unit * cfg.unit)  # unit-aligned: no recompute
    marks = [a.tokens * k // a.points for k in range(1, a.points + 1)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"{a.variant}: {model.num_params():,} parameters, d_model {a.d_model}, {a.n_layers} layers, "
          f"unit {cfg.unit}, pieces of {piece}, batch {a.batch}, {a.tokens:,} tokens on {device} ({name})", flush=True)
    t0 = time.perf_counter()
    points = stream_benchmark(model, a.tokens, piece, marks, batch=a.batch, log=lambda m: print(m, flush=True))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "device": name, "params": model.num_params(), "piece_len": piece,
                       "torch": torch.__version__, "points": [asdict(pt) for pt in points]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
