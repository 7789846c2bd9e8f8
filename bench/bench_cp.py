"""Context parallelism: the wavefront's idle fraction and the bytes handed over per slice boundary.

Runs forward+backward of one batch with the sequence split over P ranks (real processes, gloo on
CPU), for each P given, and reports per rank: step time, seconds spent waiting (for a neighbour's
state in forward, its gradient in backward, and in the gradient sum over the group) as a fraction
of the step, and the state bytes handed to the next rank per block. The model of the wavefront predicts an idle fraction of
``(P-1) / (m L + P - 1)`` per pass for L blocks and m pieces per hand-off (docs/context_parallel.md).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_cp.py --cp 1 2 4 --microbatches 1 2

Each rank runs one thread; with more ranks than cores (P=4 on a 2-core VM) ranks also wait for a
core, which the gloo timers count as compute, not idle.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, store: str, a: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from titans_pretrain.distributed.context_parallel import ContextParallel, apply_context_parallel
    from titans_pretrain.models import TitansConfig, TitansLM

    torch.manual_seed(0)
    cfg = TitansConfig(variant=a.variant, vocab_size=a.vocab, d_model=a.d_model, n_layers=a.n_layers,
                       n_heads=a.n_heads, chunk_size=a.chunk, segment_len=a.segment, window=a.window)
    model = TitansLM(cfg)
    cp = ContextParallel(dist.group.WORLD, a.microbatch)
    if world > 1:
        apply_context_parallel(model, cp)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = cp.shard(ids[:, :-1]), cp.shard(ids[:, 1:])
    times, waits_f, waits_b = [], [], []
    for step in range(a.warmup + a.steps):
        cp.stats.reset()
        dist.barrier()
        t0 = time.perf_counter()
        cp.count_tokens(y)
        cp.loss(model(x).logits, y).backward()
        cp.flush()
        cp.sync_gradients(list(model.parameters()))
        elapsed = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        if step >= a.warmup:
            times.append(elapsed)
            waits_f.append(cp.stats.wait_forward_s)
            waits_b.append(cp.stats.wait_backward_s + cp.stats.wait_sync_s)
    step_s = statistics.median(times)
    res = {"rank": rank, "step_s": step_s, "wait_forward_s": statistics.median(waits_f),
           "wait_backward_s": statistics.median(waits_b),
           "boundary_bytes": sum(cp.stats.boundary_bytes.values()),
           "boundary_bytes_per_block": sorted(set(cp.stats.boundary_bytes.values()))}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run(world: int, a: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(world, os.path.join(tmp, "store"), a, tmp), nprocs=world,
                           start_method="spawn")  # joins
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--microbatches", type=int, nargs="+", default=[1])
    p.add_argument("--variant", default="mac", choices=["mac", "mag", "mal", "lmm"])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    print(f"{a.variant} d{a.d_model} L{a.n_layers} H{a.n_heads} chunk {a.chunk} segment {a.segment} "
          f"window {a.window}, B={a.batch}, T={a.seq}, fp32, 1 thread per rank, {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}", flush=True)
    print("| P | m | step s (max rank) | tokens/s | idle (waits incl. gradient sum), rank 0 / last | mean idle | model "
          "(P-1)/(mL+P-1) | bytes per block boundary |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    rows = []
    for world in a.cp:
        for m in (a.microbatches if world > 1 else [1]):
            a.microbatch = m
            ranks = run(world, a)
            step = max(r["step_s"] for r in ranks)
            idle = [(r["wait_forward_s"] + r["wait_backward_s"]) / r["step_s"] for r in ranks]
            model = (world - 1) / (m * a.n_layers + world - 1)
            bpb = ranks[0]["boundary_bytes_per_block"]
            rows.append({"cp": world, "microbatches": m, "step_s": step, "tokens_per_s": a.batch * a.seq / step,
                         "idle": idle, "model_idle": model, "bytes_per_block": bpb})
            print(f"| {world} | {m} | {step:.3f} | {a.batch * a.seq / step:,.0f} | {idle[0]:.2f} / {idle[-1]:.2f} | "
                  f"{statistics.mean(idle):.2f} | {model:.2f} | {', '.join(f'{b:,}' for b in bpb) or '-'} |",
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
