"""The trainer: engine steps over a stream of batches, and callbacks for everything else.

`Trainer` is the loop alone: it asks the callbacks whether to stop, runs the engine's step inside
their step contexts, counts the step, and hands them the result. `build_trainer` assembles a
training run from a config (process group, mesh, run folder, data, engine, and the callbacks:
preemption, checkpointing, metric sinks, step metrics, the non-finite guard, validation, sampling);
`profile` runs the same loop with its profiler callback.

Exit codes (also returned by `titans-pretrain train`): 0 done, `EXIT_PREEMPTED` (75) stopped by
SIGTERM/SIGUSR1 after saving (requeue the job), `EXIT_DIVERGED` (3) too many non-finite steps.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from titans_pretrain.config import RunConfig, resolve_layout
from titans_pretrain.data.shards import ShardError
from titans_pretrain.distributed.mesh import build_mesh, init_distributed
from titans_pretrain.models import TitansLM
from titans_pretrain.models.flops import flops_per_token
from titans_pretrain.train import checkpoint as ckpt
from titans_pretrain.train.callbacks import (Callback, Checkpointing, MetricSinks, NonFiniteGuard,
                                             Preemption, Sampling, StepMetrics, TrainingDiverged,
                                             Validation)
from titans_pretrain.train.checkpoint import Progress
from titans_pretrain.train.data import ensure_dataset, forever, make_loader
from titans_pretrain.train.engines import build_engine
from titans_pretrain.train.run_lock import RunLock, RunLockError
from titans_pretrain.train.signals import EXIT_DIVERGED


class Trainer:
    def __init__(self, engine, batches: Iterator[list[dict]], *, steps: int, tokens_per_step: int,
                 callbacks: Sequence[Callback], device: torch.device, log: Callable[[str], None] = print):
        self.engine, self.batches, self.steps = engine, batches, steps
        self.tokens_per_step, self.callbacks = tokens_per_step, list(callbacks)
        self.device, self.log = device, log
        self.progress = Progress()

    def fit(self) -> int:
        """Run to `steps` (0) or until a callback stops the run (its exit code)."""
        try:
            for cb in self.callbacks:
                cb.on_start(self)
            while self.progress.step < self.steps:
                code = next((c for c in (cb.before_step(self) for cb in self.callbacks) if c is not None), None)
                if code is not None:
                    for cb in self.callbacks:
                        cb.on_stop(self, code)
                    return code
                batch = next(self.batches)
                with contextlib.ExitStack() as around:
                    for cb in self.callbacks:
                        around.enter_context(cb.step_context(self))
                    result = self.engine.train_step(batch)
                self._count(result.finite)
                for cb in self.callbacks:
                    cb.after_step(self, result, batch)
            for cb in self.callbacks:
                cb.on_end(self)
            return 0
        finally:
            for cb in reversed(self.callbacks):
                cb.close(self)

    def _count(self, finite: bool) -> None:
        p = self.progress
        p.step += 1
        p.tokens += self.tokens_per_step
        if finite:
            p.bad_in_a_row = 0
        else:  # the engine skipped the update
            p.bad_in_a_row += 1
            p.skipped += 1

    def record(self, metrics: dict) -> None:
        """A metrics record for whichever callbacks take them (the sinks)."""
        for cb in self.callbacks:
            cb.on_metrics(self, metrics)


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def micro_batches(stream: Iterator[dict], grad_accum: int) -> Iterator[list[dict]]:
    """One step's micro-batches at a time (lazy: the loader is first read after a resume placed it)."""
    while True:
        yield [next(stream) for _ in range(grad_accum)]


def _claim_run_dir(lock: RunLock, rank: int, world: int) -> None:
    """Rank 0 locks the run folder; its refusal reaches every rank (a broadcast instead of a bare
    barrier), so no rank waits for a rank 0 that gave up."""
    refusal = [None]
    if rank == 0:
        try:
            lock.acquire()
        except RunLockError as exc:
            refusal = [str(exc)]
    if world > 1:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise RunLockError(refusal[0])


def build_trainer(cfg: RunConfig, run_lock: RunLock) -> Trainer:
    """A training run of `cfg` in this process. Everything that can refuse the run (the lock, the
    data, the resume rules) is checked before the run folder is written to."""
    device = init_distributed(cfg.parallel.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0

    def log(msg: str) -> None:
        if is_main:
            print(msg, flush=True)

    layout = resolve_layout(cfg, world)
    dims = build_mesh(layout, device)
    run_dir = Path(cfg.run_dir)
    set_deterministic(cfg.train.deterministic)
    _claim_run_dir(run_lock, rank, world)
    manifest = ensure_dataset(cfg, log=log)
    loader = make_loader(manifest, cfg, "train", dims.dp_rank, dims.dp_size, layout.global_batch_seqs)
    checkpointing = Checkpointing(cfg, ckpt.CheckpointManager(run_dir / "checkpoints", cfg.checkpoint, log=log),
                                  manifest=manifest, loader=loader, dims=dims, layout=layout, rank=rank,
                                  world=world, log=log)
    checkpointing.check_resumable()
    checkpointing.record_run(run_dir)
    with torch.device("meta"):  # for the counts only: no memory, no draws
        skeleton = TitansLM(cfg.model, init=False)
    engine = build_engine(cfg, dims, device)
    tokens_per_step = layout.global_batch_seqs * cfg.data.seq_len
    log(f"[train] {skeleton.num_params():,} parameters, {world} process(es), layout dp={layout.dp_size} "
        f"(replicate {layout.dp_replicate} x shard {layout.dp_shard}) x cp={layout.cp} x tp={layout.tp} x "
        f"pp={layout.pp}, grad accumulation {layout.grad_accum}, {tokens_per_step:,} tokens/step, "
        f"engine {engine.name}")
    callbacks = [
        Preemption(cfg.train.stop_at),
        checkpointing,  # resumes before the sinks cut metrics.jsonl back to the resumed step
        MetricSinks(cfg, run_dir, enabled=is_main),
        NonFiniteGuard(cfg.train.max_bad_steps, cfg.model.n_layers),
        StepMetrics(cfg, flops_per_token(skeleton, cfg.model, cfg.data.seq_len), world, manifest, loader),
        Validation(cfg, manifest, dims),
        Sampling(cfg, manifest.tokenizer_path, run_dir, is_main),
    ]
    return Trainer(engine, micro_batches(forever(loader), layout.grad_accum), steps=cfg.train.steps,
                   tokens_per_step=tokens_per_step, callbacks=callbacks, device=device, log=log)


def train(cfg: RunConfig) -> int:
    """Run one training job in this process (a rank of a launched group, or alone). The run
    folder's lock is held from the start until this returns, also when the start fails. A refusal
    or failure that every rank reaches is printed once, by rank 0, without a traceback."""
    lock = RunLock(cfg.run_dir)

    def say(msg: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(msg, flush=True)

    try:
        trainer = build_trainer(cfg, lock)
        code = trainer.fit()
        if code == 0 and trainer.progress.step >= cfg.train.steps:
            p = trainer.progress
            trainer.log(f"[train] done: {p.step} steps, {p.tokens:,} tokens. Run folder: "
                        f"{Path(cfg.run_dir).resolve()} (metrics.jsonl, config.yaml, checkpoints/latest)")
        return code
    except TrainingDiverged as exc:
        say(f"error: {exc}")
        return EXIT_DIVERGED
    except ckpt.ResumeError as exc:
        say(f"error: cannot resume: {exc}")
        return 1
    except (RunLockError, ckpt.CheckpointSaveError) as exc:
        say(f"error: {exc}")
        return 1
    except ShardError as exc:  # found by the rank that reads the shard
        print(f"error: {exc}", flush=True)
        return 1
    finally:
        lock.release()
