"""One profile: build the trainer's engine for a config, time its real `train_step`, profile it.

Batches are random token ids of the configured shape: the profile measures the training step
(forward, backward, clipping, optimizer, gradient communication), not data loading, and needs no
prepared dataset. Timed steps run without the profiler; a few further steps run under it for the
breakdown and the trace, so profiler overhead never enters the tokens/s figure.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

from titans_pretrain.config import RunConfig, resolve_layout
from titans_pretrain.distributed.mesh import build_mesh, init_distributed
from titans_pretrain.models import TitansLM
from titans_pretrain.models.flops import device_peak_flops, mfu
from titans_pretrain.profile.breakdown import STEP_SCOPE, breakdown
from titans_pretrain.profile.flops_split import flops_split
from titans_pretrain.profile.memory import PeakMemory
from titans_pretrain.profile.scopes import install_scopes
from titans_pretrain.train.engines import build_engine


@dataclass
class ProfileResult:
    """What one profile measured (all ranks agree; rank 0 writes it)."""

    variant: str
    seq_len: int
    layout: dict
    engine: str
    device: str
    world_size: int
    n_params: int
    tokens_per_step: int
    warmup_steps: int
    timed_steps: int
    step_time_s: float  # mean over the timed steps
    step_times_s: list[float]
    tokens_per_s: float  # all devices together
    tokens_per_s_per_device: float
    flops_per_token: dict  # total, dense, attention, memory (+ memory parts)
    mfu: float | None  # None where the device peak is unknown (CPU)
    peak_flops: float | None
    peak_memory_bytes: int
    peak_memory_kind: str
    breakdown_s: dict = field(default_factory=dict)  # per profiled step
    losses: list[float] = field(default_factory=list)
    trace: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def random_batches(cfg: RunConfig, micro_batch: int, n: int, device: torch.device, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.data.seq_len + 1), generator=gen)
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_over_ranks(value: float, device: torch.device) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
    return value


def profile_config(cfg: RunConfig, *, steps: int, warmup: int, profile_steps: int,
                   trace_path: Path | None, log: Callable[[str], None] = print) -> ProfileResult:
    """Warm up, time `steps` engine steps, then profile `profile_steps` more (0: no breakdown)."""
    if steps < 1 or warmup < 0 or profile_steps < 0:
        raise ValueError(f"need steps >= 1, warmup >= 0, profile steps >= 0 (got {steps}, {warmup}, "
                         f"{profile_steps})")
    device = init_distributed(cfg.parallel.backend)
    world = dist.get_world_size()
    layout = resolve_layout(cfg, world)
    dims = build_mesh(layout, device)
    engine = build_engine(cfg, dims, device, prepare=install_scopes)  # the trainer's engine
    with torch.device("meta"):
        skeleton = TitansLM(cfg.model, init=False)
    split = flops_split(skeleton, cfg.model, cfg.data.seq_len)
    n_params = skeleton.num_params()
    tokens_per_step = layout.global_batch_seqs * cfg.data.seq_len
    batches = random_batches(cfg, layout.micro_batch_size, layout.grad_accum, device,
                             cfg.train.seed + dims.dp_rank)
    memory = PeakMemory(device)
    losses, times = [], []
    total = warmup + steps
    for i in range(total):
        if i == warmup:
            _sync(device)
            memory.reset()
        t0 = time.perf_counter()
        result = engine.train_step(batches)
        _sync(device)
        dt = time.perf_counter() - t0
        losses.append(result.loss)
        phase = "warm-up" if i < warmup else "timed"
        if i >= warmup:
            times.append(_max_over_ranks(dt, device))  # a step ends when its slowest rank ends
        log(f"[profile] T={cfg.data.seq_len} {phase} step {i + 1}/{total}: {dt * 1e3:.1f} ms, "
            f"{tokens_per_step / dt:,.0f} tokens/s, loss {result.loss:.3f}")
    peak_mem, mem_kind = memory.peak()
    step_time = sum(times) / len(times)
    tps = tokens_per_step / step_time
    peak = device_peak_flops(device)
    parts: dict = {}
    trace = None
    if profile_steps:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        log(f"[profile] T={cfg.data.seq_len}: {profile_steps} step(s) under torch.profiler")
        with profile(activities=activities) as prof:
            for _ in range(profile_steps):
                with record_function(STEP_SCOPE):
                    engine.train_step(batches)
                    _sync(device)
        parts = timed_breakdown(breakdown(prof.events(), device.type), profile_steps, step_time, world)
        if trace_path is not None:
            trace_path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace_path))
            trace = str(trace_path)
    return ProfileResult(
        variant=cfg.model.variant, seq_len=cfg.data.seq_len, layout=asdict(layout),
        engine=cfg.parallel.engine, device=_device_name(device), world_size=world, n_params=n_params,
        tokens_per_step=tokens_per_step, warmup_steps=warmup, timed_steps=steps,
        step_time_s=step_time, step_times_s=times, tokens_per_s=tps,
        tokens_per_s_per_device=tps / world, flops_per_token=split,
        mfu=mfu(split["total"], tps, world, peak), peak_flops=peak, peak_memory_bytes=peak_mem,
        peak_memory_kind=mem_kind, breakdown_s=parts, losses=losses, trace=trace)


def timed_breakdown(parts: dict, profile_steps: int, step_time: float, world: int) -> dict:
    """The profiled steps' breakdown as shares of the *timed* step, so the parts add up to the
    reported ms/step (profiled steps run slower: the profiler's own overhead). In one process no
    communication can happen: the no-op collectives' time counts as `other`."""
    per_step = {k: v / profile_steps for k, v in parts.items() if isinstance(v, float)}
    if world == 1:
        per_step["other"] += per_step["communication"]
        per_step["communication"] = 0.0
    profiled = per_step.pop("total")
    scale = step_time / profiled if profiled > 0 else 0.0
    out = {k: v * scale for k, v in per_step.items()}
    return {"basis": f"{parts['basis']}, shares scaled to the timed step", "total": step_time, **out,
            "profiled_step": profiled}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
