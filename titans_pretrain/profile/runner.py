"""One profile: the trainer's loop and engine for a config, with the profiler callback.

Batches are random token ids of the configured shape: the profile measures the training step
(forward, backward, clipping, optimizer, gradient communication), not data loading, and needs no
prepared dataset. Timed steps run without the profiler; a few further steps run under it for the
breakdown and the trace, so profiler overhead never enters the tokens/s figure.
"""
from __future__ import annotations

import contextlib
import itertools
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
from titans_pretrain.train.callbacks import Callback
from titans_pretrain.train.engines import build_engine
from titans_pretrain.train.trainer import Trainer


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


class Profiler(Callback):
    """`warmup` untimed steps, `steps` timed ones (the slowest rank's time; peak memory from the
    first timed step on), then `profile_steps` under torch.profiler for the breakdown and trace."""

    def __init__(self, *, warmup: int, steps: int, profile_steps: int, seq_len: int, world: int,
                 trace_path: Path | None, log: Callable[[str], None]):
        self.warmup, self.steps, self.profile_steps = warmup, steps, profile_steps
        self.seq_len, self.world, self.trace_path, self.log = seq_len, world, trace_path, log
        self.losses: list[float] = []
        self.times: list[float] = []
        self.parts: dict = {}
        self.trace: str | None = None
        self.prof = None

    @property
    def timed_end(self) -> int:
        """Steps before the profiled ones: warm-up and timed."""
        return self.warmup + self.steps

    @property
    def total(self) -> int:
        return self.timed_end + self.profile_steps

    def on_start(self, trainer) -> None:
        self.memory = PeakMemory(trainer.device)

    @contextlib.contextmanager
    def step_context(self, trainer):
        i, device = trainer.progress.step, trainer.device
        if i < self.timed_end:
            if i == self.warmup:
                _sync(device)
                self.memory.reset()
            t0 = time.perf_counter()
            yield
            _sync(device)
            self._dt = time.perf_counter() - t0
            return
        if i == self.timed_end:
            self.log(f"[profile] T={self.seq_len}: {self.profile_steps} step(s) under torch.profiler")
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.start()
        with record_function(STEP_SCOPE):
            yield
            _sync(device)

    def after_step(self, trainer, result, batch) -> None:
        i = trainer.progress.step  # steps done
        if i <= self.timed_end:
            self.losses.append(result.loss)
            if i > self.warmup:
                self.times.append(_max_over_ranks(self._dt, trainer.device))  # a step ends when its slowest rank ends
            phase = "warm-up" if i <= self.warmup else "timed"
            self.log(f"[profile] T={self.seq_len} {phase} step {i}/{self.timed_end}: {self._dt * 1e3:.1f} ms, "
                     f"{trainer.tokens_per_step / self._dt:,.0f} tokens/s, loss {result.loss:.3f}")
            if i == self.timed_end:
                self.peak_memory = self.memory.peak()
            return
        if i == self.total:
            self.prof.stop()
            self.parts = timed_breakdown(breakdown(self.prof.events(), trainer.device.type), self.profile_steps,
                                         self.step_time, self.world)
            if self.trace_path is not None:
                self.trace_path.parent.mkdir(parents=True, exist_ok=True)
                self.prof.export_chrome_trace(str(self.trace_path))
                self.trace = str(self.trace_path)
            self.prof = None

    @property
    def step_time(self) -> float:
        return sum(self.times) / len(self.times)

    def close(self, trainer) -> None:
        if self.prof is not None:  # an error mid-profile
            self.prof.stop()


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
    tokens_per_step = layout.global_batch_seqs * cfg.data.seq_len
    batches = random_batches(cfg, layout.micro_batch_size, layout.grad_accum, device,
                             cfg.train.seed + dims.dp_rank)
    profiler = Profiler(warmup=warmup, steps=steps, profile_steps=profile_steps, seq_len=cfg.data.seq_len,
                        world=world, trace_path=trace_path, log=log)
    Trainer(engine, itertools.repeat(batches), steps=profiler.total, tokens_per_step=tokens_per_step,
            callbacks=[profiler], device=device, log=log).fit()
    peak_mem, mem_kind = profiler.peak_memory
    step_time = profiler.step_time
    tps = tokens_per_step / step_time
    peak = device_peak_flops(device)
    return ProfileResult(
        variant=cfg.model.variant, seq_len=cfg.data.seq_len, layout=asdict(layout),
        engine=cfg.parallel.engine, device=_device_name(device), world_size=world,
        n_params=skeleton.num_params(), tokens_per_step=tokens_per_step, warmup_steps=warmup,
        timed_steps=steps, step_time_s=step_time, step_times_s=profiler.times, tokens_per_s=tps,
        tokens_per_s_per_device=tps / world, flops_per_token=split,
        mfu=mfu(split["total"], tps, world, peak), peak_flops=peak, peak_memory_bytes=peak_mem,
        peak_memory_kind=mem_kind, breakdown_s=profiler.parts, losses=profiler.losses,
        trace=profiler.trace)


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
