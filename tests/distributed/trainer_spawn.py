"""Run a function on N real gloo processes (spawned, file-store rendezvous) and collect results."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _entry(rank: int, fn, world: int, store: str, out: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, world: int, *args, timeout: float = 240) -> list:
    """`fn(rank, world, *args)` on `world` processes; returns each rank's return value."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(fn, world, store, tmp, args), nprocs=world, join=False,
                                 start_method="spawn")
        while not ctx.join(timeout=timeout):
            pass
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
