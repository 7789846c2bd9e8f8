"""Process-group start-up and the DeviceMesh with named dims, in one place.

Every launcher sets a different environment (torchrun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; srun:
SLURM_*; a plain `python` call: nothing). `init_distributed` maps them all to one process group, so
the rest of the trainer never asks how it was started.
"""
from __future__ import annotations

import datetime
import gc
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titans_pretrain.config import Layout

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist (`node[01-03,7],gpu-a[1-2]-ib`) into host names, in order.

    Pure Python (the same answer as `scontrol show hostnames`), so rendezvous needs no Slurm binary.
    """
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    hosts: list[str] = []
    for item in filter(None, (x.strip() for x in items)):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [literal]
            if ranges:
                choices = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()):
                        raise ValueError(f"bad Slurm node list {nodelist!r}: range {part!r} is not N or N-M")
                    for n in range(int(lo), int(hi or lo) + 1):
                        choices.append(f"{literal}{n:0{len(lo)}d}")
            expanded = [e + c for e in expanded for c in choices]
        hosts.extend(expanded)
    return hosts


def slurm_master_port(job_id: int | str) -> int:
    """A port from the job id: every task of a job computes the same one with no exchange, and jobs
    that share a node (ids not 20000 apart) get different ones. Range 20000-39999."""
    return 20000 + int(job_id) % 20000


def _env_from_slurm() -> None:
    """Under `srun` without torchrun: derive the torch variables from Slurm's.

    MASTER_ADDR is the first host of the step's node list (rank 0 runs there), MASTER_PORT comes
    from the job id; both may be preset by the user. Nothing happens when RANK is already set
    (torchrun inside srun) or outside a Slurm task.
    """
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        env.setdefault("MASTER_ADDR", slurm_hostnames(nodelist)[0])
    else:
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    env.setdefault("MASTER_PORT", str(slurm_master_port(env.get("SLURM_JOB_ID", "0"))))


def device_for_local_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_s: float = 1800) -> torch.device:
    """Join (or create, for a lone process) the default process group; return this rank's device."""
    _env_from_slurm()
    device = device_for_local_rank()
    if dist.is_initialized():
        return device
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("parallel.backend=nccl needs GPUs; none is visible. Use parallel.backend=gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # a plain single process: local rank 0, as a launcher would say (DeepSpeed asserts on it)
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, timeout=timeout)
    return device


def shutdown_distributed() -> None:
    """Leave the process groups at the end of a rank's run (no-op when none was joined).

    Garbage is collected first, so the model, optimizer and the collectives' state are freed while
    the interpreter is whole: left to interpreter teardown, gloo objects can die in any order (a
    rank once aborted at exit with "terminate called without an active exception")."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class ParallelDims:
    """The mesh plus the coordinates the trainer needs."""

    mesh: DeviceMesh
    layout: Layout

    @property
    def dp_mesh(self) -> DeviceMesh:
        """1-D (dp_shard) or 2-D (dp_replicate, dp_shard) mesh for FSDP/HSDP and gradient sync."""
        if self.layout.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]

    @property
    def dp_rank(self) -> int:
        coord = dict(zip(self.mesh.mesh_dim_names, self.mesh.get_coordinate()))
        return coord["dp_replicate"] * self.layout.dp_shard + coord["dp_shard"]

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size


def build_mesh(layout: Layout, device: torch.device) -> ParallelDims:
    sizes = {"pp": layout.pp, "dp_replicate": layout.dp_replicate, "dp_shard": layout.dp_shard,
             "cp": layout.cp, "tp": layout.tp}
    mesh = init_device_mesh(device.type, tuple(sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    return ParallelDims(mesh, layout)
