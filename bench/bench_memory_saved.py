"""What the memory core keeps for backward, and what recomputing it costs (CPU or GPU).

One memory layer's core (``memory_chunked``) at a preset's per-layer shape: forward with gradients,
then backward. Reports the bytes held between forward and backward (resident memory growth on CPU,
``torch.cuda.memory_allocated`` on CUDA, each case in a fresh process so that the allocator's cache
does not blur the numbers), the bytes that go through ``save_for_backward`` (what activation
checkpointing can free), and forward and backward times, for each ``model.memory_state_interval``.

    python bench/bench_memory_saved.py                          # 170M shape, intervals 1 2 4 8
    python bench/bench_memory_saved.py --heads 16 --D 96 --intervals 1 4 --record

``--record`` appends the table to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def case(args) -> dict:
    import torch

    from titans_pretrain.models.memory_ops import init_state, memory_chunked

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    B, H, T, D, E = args.batch, args.heads, args.T, args.D, args.expansion * args.D
    nrm = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    leaves = [nrm(torch.randn(B, H, T, D, generator=g)), nrm(torch.randn(B, H, T, D, generator=g)),
              torch.randn(B, H, T, D, generator=g), 0.003 * torch.rand(B, H, T, generator=g),
              0.9 * torch.rand(B, H, T, generator=g), 0.01 * torch.rand(B, H, T, generator=g),
              torch.randn(H, D, E, generator=g) / D ** 0.5, torch.randn(H, E, D, generator=g) / E ** 0.5]
    leaves = [x.to(device).requires_grad_() for x in leaves]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def run():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, state = memory_chunked(*leaves[:6], init_state(leaves[6:], B), chunk_size=args.chunk,
                                      surprise_clip=0.3, state_interval=args.interval)
        return y.float().sum() + sum(w.sum() for w in state.weights)

    run().backward()  # warm-up (allocator, first-call costs)
    for x in leaves:
        x.grad = None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    saved[0] = 0
    sync()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else _rss()
    t0 = time.perf_counter()
    loss = run()
    sync()
    t1 = time.perf_counter()
    held = (torch.cuda.memory_allocated() if device.type == "cuda" else _rss()) - base
    loss.backward()
    sync()
    t2 = time.perf_counter()
    return {"interval": args.interval, "held_MiB": held / 2**20, "saved_for_backward_MiB": saved[0] / 2**20,
            "forward_s": t1 - t0, "backward_s": t2 - t1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--interval", type=int, help=argparse.SUPPRESS)  # one case, in a child process
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if args.interval is not None:
        print(json.dumps(case(args)))
        return 0
    rows = []
    for k in args.intervals:
        cmd = [sys.executable, __file__, "--interval", str(k)] + [
            f"--{n}={getattr(args, n)}" for n in ("device", "batch", "heads", "T", "D", "expansion", "chunk")]
        # a fixed mmap threshold: glibc then returns every large block on free, so RSS tracks live bytes
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        rows.append(f"| {k} | {r['held_MiB']:.0f} | {r['saved_for_backward_MiB']:.0f} | {r['forward_s']:.2f} | "
                    f"{r['backward_s']:.2f} |")
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    shape = (f"B={args.batch}, H={args.heads}, T={args.T}, D={args.D}, E={args.expansion * args.D}, "
             f"chunk {args.chunk}, clip 0.3, {args.device}")
    table = [f"### Memory core: saved states and recompute, {datetime.date.today()}, commit {commit}",
             f"`python bench/bench_memory_saved.py {' '.join(sys.argv[1:])}` on {platform.node()} "
             f"({os.cpu_count()} CPUs); {shape}.", "",
             "| state interval | held after forward (MiB) | through save_for_backward (MiB) | forward (s) | "
             "backward (s) |", "| ---: | ---: | ---: | ---: | ---: |", *rows, ""]
    print("\n".join(table))
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
