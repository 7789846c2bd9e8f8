"""Per-layer statistics of the neural memory: metrics at the logging interval, and where a
non-finite step began.

The memory's inner optimisation is the first thing to blow up in a Titans model that diverges
(docs/training.md, "Memory stability"). So at every logging step the trainer attaches a
:class:`~titans_pretrain.models.memory.MemoryMonitor` to each memory layer for that step and logs,
per block ``i``, ``memory_weight_norm_max/i`` (the largest per-head Frobenius norm of a memory weight
at the end of a call) and ``memory_theta_mean/i`` (the mean inner learning rate). After a non-finite
step it runs the step's micro-batches forward once more with monitors that locate the first
non-finite token, and names the layer.

Every rank takes part (the reductions are collectives over the whole world, so tensor, pipeline and
context parallel ranks each contribute the layers and heads they hold).
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
from torch import nn

from titans_pretrain.models.memory import MemoryLayer, MemoryMonitor

__all__ = ["MemoryMonitors"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_NONE = 2**62  # "no non-finite token" in the MIN reduction


def memory_layers(model: nn.Module) -> dict[int, MemoryLayer]:
    """This rank's memory layers by global block index (wrappers such as activation checkpointing
    add name parts, the block index stays)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, MemoryLayer) and (m := _BLOCK.search(name)):
            found[int(m.group(1))] = module
    return found


class MemoryMonitors:
    """Attach monitors to every memory layer of ``model`` for a while, then reduce what they saw."""

    def __init__(self, model: nn.Module, n_layers: int, device: torch.device):
        self.layers = memory_layers(model)
        self.n_layers, self.device = n_layers, device
        self.monitors: dict[int, MemoryMonitor] = {}

    @contextlib.contextmanager
    def attached(self, locate: bool = False):
        self.monitors = {i: MemoryMonitor(locate) for i in self.layers}
        for i, layer in self.layers.items():
            layer.monitor = self.monitors[i]
        try:
            yield self
        finally:
            for layer in self.layers.values():
                layer.monitor = None

    def _reduce(self, values: torch.Tensor, op) -> torch.Tensor:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values, op=op)
        return values

    def metrics(self) -> dict[str, float]:
        """``memory_weight_norm_max/i`` and ``memory_theta_mean/i`` for every block with a memory."""
        stats = torch.zeros(self.n_layers, 3, device=self.device)  # norm max, theta sum, theta count
        for i, m in self.monitors.items():
            if m.theta_count:
                stats[i, 0] = m.weight_norm_max
                stats[i, 1] = m.theta_sum
                stats[i, 2] = m.theta_count
        norms = self._reduce(stats[:, 0].contiguous(), dist.ReduceOp.MAX).tolist()
        sums = self._reduce(stats[:, 1:].contiguous(), dist.ReduceOp.SUM).tolist()
        out = {}
        for i, (norm, (theta, count)) in enumerate(zip(norms, sums)):
            if count:
                out[f"memory_weight_norm_max/{i}"] = norm
                out[f"memory_theta_mean/{i}"] = theta / count
        return out

    def nonfinite_report(self) -> str:
        """After a forward with ``attached(locate=True)``: which memory went non-finite first, and where."""
        first = torch.full((self.n_layers, 3), _NONE, dtype=torch.int64, device=self.device)
        for i, m in self.monitors.items():
            for j, pos in enumerate((m.first_bad_input, m.first_bad_input_chunk, m.first_bad_read)):
                if pos is not None:
                    first[i, j] = pos
        first = self._reduce(first, dist.ReduceOp.MIN).tolist()
        for i, (bad_input, bad_input_chunk, bad_read) in enumerate(first):
            if bad_input != _NONE and bad_input_chunk <= bad_read:
                return (f"the input of block {i}'s memory was already non-finite at token {bad_input}: the "
                        "memory is not where it started (look at the layers before it, or the data)")
            if bad_read != _NONE:
                return (f"the memory of block {i} went non-finite first, at token {bad_read} (its input was "
                        "finite up to there): its inner optimisation diverged; see docs/training.md, "
                        "\"Memory stability\" (model.surprise_clip, model.theta_max, optim.lr)")
        return ("every memory read was finite in a forward of this step's batch, so the backward overflowed: "
                "a memory at the edge of divergence (weight or gradient norms climbing over the last steps) "
                "overflows in backward before its forward does, see docs/training.md, \"Memory stability\"; "
                "else lower optim.lr and check the data")
