"""Forward+backward throughput and peak memory: our memory and MAC model vs titans-pytorch vs dense.

Not a test. Each case runs in its own subprocess (so peak memory is per case) and all cases of one
invocation run on the same machine back to back, so their ratios are comparable. Usage::

    python bench/bench_memory.py                      # the CPU reference shapes, print a table
    python bench/bench_memory.py --record             # ... and append it to bench/RESULTS.md
    python bench/bench_memory.py --cases core,tp_nm64 --repeats 5
    python bench/bench_memory.py --sweep 1024,2048,4096 --record   # fixed tokens per step

The competitor is the public `titans-pytorch` package (`pip install titans-pytorch`, the `[bench]`
extra); its cases are skipped with a note when it is not installed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (B, T, heads, head_dim, chunk, memory depth, expansion): the CPU reference shape.
SHAPE = dict(B=2, T=2048, H=4, D=64, chunk=64, depth=2, expansion=4)
MODEL = dict(d_model=256, n_layers=4, n_heads=4, vocab=4096, segment=256)

CASES = {
    "core": "ours: memory_chunked (projected q, k, v; the memory core)",
    "layer": "ours: MemoryLayer (projections, conv, gates, memory, norm, gate, out-proj)",
    "tp_nm64": "titans-pytorch NeuralMemory, batch_size=64 (the same chunk-start rule)",
    "tp_nm": "titans-pytorch NeuralMemory, batch_size=None (default: one base point, less work)",
    "mac": "ours: TitansLM variant=mac",
    "tp_mac": "titans-pytorch MemoryAsContextTransformer",
    "dense": "dense pre-norm GPT (SDPA, SwiGLU) of the same width and depth",
}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast_step(dev: torch.device, dtype: torch.dtype, loss_fn):
    """One forward (under autocast unless fp32) + backward of a scalar loss."""
    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn()
        loss.float().backward()

    return step


def _build(case: str, dev: torch.device, dtype: torch.dtype):
    """Return (step_fn, tokens_per_step, n_params) for a case."""
    s, m = SHAPE, MODEL
    B, T, H, D = s["B"], s["T"], s["H"], s["D"]
    dim = H * D
    g = torch.Generator(device="cpu").manual_seed(0)

    if case == "core":
        from titans_pretrain.models.memory_ops import init_state, memory_chunked

        q, k, v = (torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=g), dim=-1).to(dev)
                   .requires_grad_() for _ in range(3))
        gates = [torch.full((B, H, T), x, device=dev, requires_grad=True) for x in (0.01, 0.9, 0.01)]
        E = s["expansion"] * D
        dims = [D] + [E] * (s["depth"] - 1) + [D]
        m0 = [(torch.randn(H, dims[i], dims[i + 1], generator=g) / dims[i] ** 0.5).to(dev).requires_grad_()
              for i in range(s["depth"])]

        def step():
            y, _ = memory_chunked(q.to(dtype), k.to(dtype), v.to(dtype), *gates, init_state(m0, B),
                                  chunk_size=s["chunk"])
            y.float().sum().backward()

        return step, B * T, sum(w.numel() for w in m0)

    if case == "layer":
        from titans_pretrain.models import TitansConfig
        from titans_pretrain.models.memory import MemoryLayer

        cfg = TitansConfig(variant="lmm", d_model=dim, n_heads=H, chunk_size=s["chunk"],
                           memory_depth=s["depth"], memory_expansion=s["expansion"])
        layer = MemoryLayer(cfg).to(dev)
        x = torch.randn(B, T, dim, generator=g).to(dev).requires_grad_()

        step = _autocast_step(dev, dtype, lambda: layer(x)[0].float().sum())
        return step, B * T, sum(p.numel() for p in layer.parameters())

    if case in ("tp_nm64", "tp_nm"):
        from titans_pytorch import NeuralMemory

        mem = NeuralMemory(dim=dim, heads=H, dim_head=D, chunk_size=s["chunk"],
                           batch_size=s["chunk"] if case == "tp_nm64" else None,
                           default_model_kwargs=dict(depth=s["depth"], expansion_factor=float(s["expansion"]))).to(dev)
        x = torch.randn(B, T, dim, generator=g).to(dev).requires_grad_()

        step = _autocast_step(dev, dtype, lambda: mem(x)[0].float().sum())
        return step, B * T, sum(p.numel() for p in mem.parameters())

    ids = torch.randint(0, m["vocab"], (B, T + 1), generator=g).to(dev)
    if case == "mac":
        from titans_pretrain.models import TitansConfig, TitansLM

        cfg = TitansConfig(variant="mac", vocab_size=m["vocab"], d_model=m["d_model"], n_layers=m["n_layers"],
                           n_heads=m["n_heads"], chunk_size=s["chunk"], memory_depth=s["depth"],
                           memory_expansion=s["expansion"], segment_len=m["segment"])
        model = TitansLM(cfg).to(dev)

        def loss_fn():
            return model(ids[:, :-1], labels=ids[:, 1:]).loss
    elif case == "tp_mac":
        from titans_pytorch import MemoryAsContextTransformer

        model = MemoryAsContextTransformer(
            num_tokens=m["vocab"], dim=m["d_model"], depth=m["n_layers"], segment_len=m["segment"],
            dim_head=D, heads=m["n_heads"], num_persist_mem_tokens=4, num_longterm_mem_tokens=4,
            neural_memory_segment_len=s["chunk"], neural_memory_batch_size=None,
            neural_memory_kwargs=dict(heads=m["n_heads"], dim_head=D, default_model_kwargs=dict(
                depth=s["depth"], expansion_factor=float(s["expansion"]))),
        ).to(dev)

        def loss_fn():
            return model(ids, return_loss=True)
    elif case == "dense":
        from bench.dense_gpt import DenseGPT

        model = DenseGPT(vocab=m["vocab"], dim=m["d_model"], depth=m["n_layers"], heads=m["n_heads"]).to(dev)

        def loss_fn():
            return model(ids[:, :-1], ids[:, 1:])
    else:
        raise SystemExit(f"unknown case {case!r}; choose from {sorted(CASES)}")

    return _autocast_step(dev, dtype, loss_fn), B * T, sum(p.numel() for p in model.parameters())


def run_case(case: str, repeats: int, dtype_name: str) -> dict:
    dev = _device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    step, tokens, n_params = _build(case, dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    best = min(times)
    if dev.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # growth of the resident set over the set-up (a process-wide figure, in KiB on Linux)
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return dict(case=case, tokens_per_s=tokens / best, step_s=best, median_s=sorted(times)[len(times) // 2],
                peak_mib=peak_mib, params=n_params)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (host: {cpu})"
    return f"{cpu}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--T", type=int, default=SHAPE["T"])
    ap.add_argument("--B", type=int, default=SHAPE["B"])
    ap.add_argument("--sweep", default="",
                    help="comma-separated sequence lengths at fixed tokens per step (B * T of the base "
                         "shape): one table row block per length, e.g. --sweep 1024,2048,4096")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    SHAPE.update(T=args.T, B=args.B)
    if args._case:
        print(json.dumps(run_case(args._case, args.repeats, args.dtype)))
        return 0

    tokens_per_step = args.B * args.T
    lengths = [int(t) for t in args.sweep.split(",") if t] or [args.T]
    rows = []
    for T in lengths:
        if tokens_per_step % T:
            raise SystemExit(f"--sweep length {T} does not divide the {tokens_per_step} tokens per step")
        B = tokens_per_step // T
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--_case", case, "--repeats", str(args.repeats), "--dtype",
                   args.dtype, "--T", str(T), "--B", str(B)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                print(f"T={T} {case}: skipped ({err})", file=sys.stderr)
                rows.append(dict(case=case, T=T, B=B, error=err))
                continue
            r = dict(json.loads(proc.stdout.strip().splitlines()[-1]), T=T, B=B)
            rows.append(r)
            print(f"T={T:6d} B={B:3d} {case:8s} {r['tokens_per_s']:10.0f} tok/s  {r['step_s']*1e3:8.1f} ms/step  "
                  f"{r['peak_mib']:8.0f} MiB  {CASES[case]}", flush=True)

    ratios = []
    for T in lengths:
        by = {r["case"]: r for r in rows if "error" not in r and r["T"] == T}
        for ours, theirs in (("core", "tp_nm64"), ("core", "tp_nm"), ("layer", "tp_nm64"), ("layer", "tp_nm"),
                             ("mac", "tp_mac"), ("mac", "dense"), ("tp_mac", "dense")):
            if ours in by and theirs in by:
                ratios.append(f"T={T} {ours}/{theirs} = {by[ours]['tokens_per_s'] / by[theirs]['tokens_per_s']:.2f}x")
    print("ratios: " + ", ".join(ratios))

    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip() or "uncommitted"
        s = SHAPE
        lines = [
            f"\n### Memory/MAC benchmark, {datetime.date.today()}, commit {commit}",
            f"Machine: {machine()}; torch {torch.__version__}; {args.dtype}; forward+backward, best of {args.repeats}.",
            f"Shape: {tokens_per_step} tokens per step (B x T below), {s['H']} heads x {s['D']}, chunk {s['chunk']}, memory depth "
            f"{s['depth']}, expansion {s['expansion']}; models: d={MODEL['d_model']}, {MODEL['n_layers']} layers, "
            f"vocab {MODEL['vocab']}, MAC segment {MODEL['segment']}.",
            "",
            "| T | B | case | tokens/s | ms/step | peak MiB | params | what |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['T']} | {r['B']} | {r['case']} | - | - | - | - | skipped: {r['error'][:80]} |")
            else:
                lines.append(f"| {r['T']} | {r['B']} | {r['case']} | {r['tokens_per_s']:.0f} | {r['step_s']*1e3:.1f} | "
                             f"{r['peak_mib']:.0f} | {r['params']:,} | {CASES[r['case']]} |")
        lines.append("")
        lines.append("Ratios: " + ", ".join(ratios))
        with open(ROOT / "bench" / "RESULTS.md", "a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
