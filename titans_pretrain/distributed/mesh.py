"""Process-group start-up and the DeviceMesh with named dims, in one place.

Every launcher sets a different environment (torchrun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; srun:
SLURM_*; a plain `python` call: nothing). `init_distributed` maps them all to one process group, so
the rest of the trainer never asks how it was started.
"""
from __future__ import annotations

import datetime
import os
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


def _env_from_slurm() -> None:
    """Under `srun` without torchrun: derive the torch variables from Slurm's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


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
    else:  # a plain single process
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, timeout=timeout)
    return device


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
