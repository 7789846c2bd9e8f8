"""The training loop: generic over engines, owns data, cadence, checkpoints, signals and logs.

Exit codes (also returned by `titans-pretrain train`): 0 done, `EXIT_PREEMPTED` (75) stopped by
SIGTERM/SIGUSR1 after saving (requeue the job), `EXIT_DIVERGED` (3) too many non-finite steps.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from titans_pretrain.config import RunConfig, resolve_layout, save_config
from titans_pretrain.data.shards import ShardError
from titans_pretrain.distributed.mesh import build_mesh, init_distributed
from titans_pretrain.models import TitansLM
from titans_pretrain.models.flops import device_peak_flops, flops_per_token, mfu
from titans_pretrain.train import checkpoint as ckpt
from titans_pretrain.train.data import ensure_dataset, forever, make_loader, source_tokens, val_problem
from titans_pretrain.train.engines import build_engine
from titans_pretrain.train.loggers import MetricLoggers, Throughput
from titans_pretrain.train.memory_monitor import MemoryMonitors
from titans_pretrain.train.resume_rules import (FIXED_ON_RESUME, config_changes,
                                                parameter_differences)
from titans_pretrain.train.run_lock import RunLock, RunLockError
from titans_pretrain.train.signals import EXIT_DIVERGED, EXIT_PREEMPTED, StopRequest


class TrainingDiverged(RuntimeError):
    """Raised after `train.max_bad_steps` non-finite steps in a row."""


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    bad_in_a_row: int = 0
    skipped: int = 0


class Trainer:
    def __init__(self, cfg: RunConfig, run_lock: RunLock | None = None):
        self.cfg = cfg
        self.device = init_distributed(cfg.parallel.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.layout = resolve_layout(cfg, self.world)
        self.dims = build_mesh(self.layout, self.device)
        self.run_dir = Path(cfg.run_dir)
        self.is_main = self.rank == 0
        set_deterministic(cfg.train.deterministic)
        self.run_lock = run_lock or RunLock(self.run_dir)  # rank 0 takes it in _claim_run_dir
        self._claim_run_dir()
        self.manifest = ensure_dataset(cfg, log=self.log)
        self.loader = make_loader(self.manifest, cfg, "train", self.dims.dp_rank, self.dims.dp_size,
                                  self.layout.global_batch_seqs)
        self.ckpt = ckpt.CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint, log=self.log)
        # Everything that can refuse this run is checked before the run folder is written to.
        self.resume_from = self.ckpt.find_resume()
        if self.resume_from is not None:
            self._check_resumable(self.resume_from)
        self._record_run()
        with torch.device("meta"):  # for the counts only: no memory, no draws
            skeleton = TitansLM(cfg.model, init=False)
        self.flops_token = flops_per_token(skeleton, cfg.model, cfg.data.seq_len)
        self.n_params = skeleton.num_params()
        self.engine = build_engine(cfg, self.dims, self.device)
        self.memory = MemoryMonitors(self.engine.module, cfg.model.n_layers, self.device)
        self.progress = Progress()
        self.tokens_per_step = self.layout.global_batch_seqs * cfg.data.seq_len

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _claim_run_dir(self) -> None:
        """Rank 0 locks the run folder; its refusal reaches every rank (a broadcast instead of a
        bare barrier), so no rank waits for a rank 0 that gave up."""
        refusal = [None]
        if self.is_main:
            try:
                self.run_lock.acquire()
            except RunLockError as exc:
                refusal = [str(exc)]
        if self.world > 1:
            dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise RunLockError(refusal[0])

    def _record_run(self) -> None:
        """Rank 0 writes config.yaml and the run's identity (`run.json`: kept across resumes,
        new in a fresh folder) and removes saves that were killed mid-way; every rank learns the id."""
        run_id = [None]
        if self.is_main:
            adopted = None
            if self.resume_from is not None and self.resume_from.parent.resolve() == self.ckpt.root.resolve():
                adopted = ckpt.read_meta(self.resume_from).get("run_id")
            run_id[0] = ckpt.read_run_id(self.run_dir) or adopted or ckpt.new_run_id()
            save_config(self.cfg, self.run_dir / "config.yaml")
            ckpt.write_run_id(self.run_dir, run_id[0])
            self.ckpt.remove_unfinished()
        if self.world > 1:
            dist.broadcast_object_list(run_id, src=0)
        self.ckpt.run_id = run_id[0]

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """A checkpoint of the current step, unless the state is suspect: never after a
        non-finite step, never with non-finite weights (the last good checkpoint stays `latest`)."""
        p = self.progress
        if p.bad_in_a_row or not self._weights_finite():
            self.log(f"[checkpoint] step {p.step}: not saved, "
                     + ("the last step was non-finite" if p.bad_in_a_row else "the weights are not finite")
                     + "; the newest good checkpoint stays latest")
            return
        extra = {"rank": self.rank, "dp_rank": self.dims.dp_rank, "dp_size": self.dims.dp_size,
                 "loader": self.loader.state_dict(), "rng": ckpt.rng_state(),
                 "scheduler": self.engine.scheduler_state(), "step": p.step, "tokens": p.tokens,
                 "bad_in_a_row": p.bad_in_a_row, "skipped": p.skipped}
        meta = {"step": p.step, "tokens": p.tokens, "world_size": self.world,
                "dp_size": self.dims.dp_size, "engine": self.engine.name,
                "layout": self.layout.__dict__, "time": time.time()}
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        async_save = self.cfg.checkpoint.async_save
        self.ckpt.save(p.step, lambda tmp: self.engine.save(tmp, async_save=async_save), extra, meta, text)

    def _weights_finite(self) -> bool:
        """Every rank's shard of every parameter is finite (agreed over all ranks)."""
        ok = torch.ones((), device=self.device)
        with torch.no_grad():
            for _, param in self.engine.named_parameters():
                local = getattr(param, "ds_tensor", None)  # a ZeRO-3 partition
                if local is None:
                    local = param.to_local() if hasattr(param, "to_local") else param
                if local.numel() and not bool(torch.isfinite(local).all()):
                    ok.zero_()
                    break
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def resume(self) -> None:
        """Load the checkpoint chosen (and checked) at start: weights, optimizer, data stream,
        RNGs, counters; the schedule and optimizer settings are this run's."""
        folder = self.resume_from
        if folder is None:
            if self.is_main:  # a run that died before its first checkpoint: its lines are redone
                self._truncate_metrics(0)
            return
        meta = ckpt.read_meta(folder)
        unchecked = " (checkpoint.verify=size does not read the data: use hash)" \
            if self.cfg.checkpoint.verify == "size" else ""
        try:
            self.engine.load(folder)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's is a BaseException
            inner = next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) else exc
            raise ckpt.ResumeError(f"{folder} cannot be read ({type(inner).__name__}: "
                                   f"{str(inner).splitlines()[0]}): it is corrupt{unchecked}; move it "
                                   "away to resume from the one before") from exc
        if not self._weights_finite():
            raise ckpt.ResumeError(f"{folder} holds non-finite weights: it is corrupt or was saved "
                                   f"after a divergence{unchecked}; move it away to resume from the "
                                   "one before")
        extras = self._resume_extras  # read and checked at start
        mine = self._pick_extra(extras, meta, self.loader)
        if mine is not None and meta["world_size"] == self.world:
            ckpt.set_rng_state(mine["rng"])
        self.engine.load_scheduler_state(extras[0]["scheduler"])
        p = self.progress
        p.step, p.tokens = extras[0]["step"], extras[0]["tokens"]
        p.bad_in_a_row, p.skipped = extras[0]["bad_in_a_row"], extras[0]["skipped"]
        if self.is_main:
            self._truncate_metrics(p.step)
        self.log(f"[checkpoint] resumed from {folder} at step {p.step} ({p.tokens:,} tokens)")

    def _check_resumable(self, folder: Path) -> None:
        """Config changes on resume follow one rule. What the checkpoint's state cannot follow
        (parameter shapes, the variant, the engine, the data stream: dataset, tokenizer, sequence
        length, batch, seed) is refused here, before anything is written, naming each difference.
        Everything else (learning rate and schedule, optimizer settings, steps, logging, intervals,
        the memory's clip or kernels) takes effect, and the log lists it."""
        meta = ckpt.read_meta(folder)
        saved = ckpt.checkpoint_config(folder)
        changes = config_changes(saved, self.cfg)
        refused = [f"{key}: {old!r} -> {new!r}" for key, old, new in changes if key in FIXED_ON_RESUME]
        if meta.get("engine", "native") != self.cfg.parallel.engine:
            refused.append(f"it was written by the {meta.get('engine')} engine and this run uses "
                           f"parallel.engine={self.cfg.parallel.engine} (load_checkpoint() reads either)")
        shapes = parameter_differences(saved.model, self.cfg.model)
        if shapes:
            keys = [f"{key}: {old!r} -> {new!r}" for key, old, new in changes
                    if key.startswith("model.") and key not in FIXED_ON_RESUME]
            refused.append(f"parameter shapes ({'; '.join(keys) or 'model keys'}: "
                           f"{'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''})")
        if not refused:
            probe = make_loader(self.manifest, self.cfg, "train", self.dims.dp_rank, self.dims.dp_size,
                                self.layout.global_batch_seqs)
            try:
                self._resume_extras = extras = ckpt.load_extras(folder)
            except Exception as exc:  # noqa: BLE001 - e.g. an old pickle that weights_only refuses
                raise ckpt.ResumeError(f"{folder}/extra cannot be read safely ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0]}); move the checkpoint away to "
                                       "resume from the one before") from exc
            try:
                self._pick_extra(extras, meta, probe, quiet=True)
            except ckpt.ResumeError as exc:
                refused.append(str(exc))
        if refused:
            raise ckpt.ResumeError(
                f"{folder} cannot continue with this config: {'; '.join(refused)}. Set these back to "
                "the checkpoint's values (its config.yaml) to continue this run, or start a new run_dir")
        allowed = [f"{key}: {old!r} in the checkpoint -> {new!r} now" for key, old, new in changes
                   if key not in ("run_dir", "checkpoint.resume")]
        if allowed:
            self.log(f"[checkpoint] {folder.name}: this run changes {'; '.join(allowed)}")

    def _truncate_metrics(self, step: int) -> None:
        """Drop lines logged after the checkpoint (by the run that died): they are redone now. A
        line that does not parse (the dead run was killed mid-write) is dropped too, and said."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep, torn = [], 0
        for line in filter(str.strip, path.read_text(errors="replace").splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                torn += 1
            elif record.get("step", 0) <= step:
                keep.append(line)
        if torn:
            self.log(f"[metrics] dropped {torn} unreadable line(s) of {path} (a run killed mid-write)")
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def _pick_extra(self, extras: list[dict], meta: dict, loader, quiet: bool = False) -> dict | None:
        """Put `loader` where the checkpoint's stream stands and return this rank's extra state
        (None on another dp size: no rank's RNGs apply). The stream does not depend on the dp size,
        so any rank's loader state continues it exactly on any number of ranks."""
        same = meta["dp_size"] == self.dims.dp_size
        mine = None
        if same:
            ours = [e for e in extras if e["dp_rank"] == self.dims.dp_rank]
            mine = ([e for e in ours if e["rank"] == self.rank] or ours)[0]
        try:
            loader.load_state_dict((mine or extras[0])["loader"])
        except ValueError as exc:
            raise ckpt.ResumeError(f"the data stream cannot continue on {self.dims.dp_size} data-parallel "
                                   f"rank(s) (checkpoint written with {meta['dp_size']}): {exc}") from exc
        if not same and not quiet:
            self.log(f"[checkpoint] data-parallel size {meta['dp_size']} -> {self.dims.dp_size}: model "
                     f"and optimizer resharded, the data stream continues exactly (epoch "
                     f"{loader.epoch}, step {loader.step} of {loader.steps_per_epoch})")
        return mine

    # ------------------------------------------------------------------ loop
    def validate(self) -> float | None:
        if "val" not in self.manifest.splits or self.cfg.train.val_batches == 0:
            return None
        problem = val_problem(self.manifest, self.cfg.train.micro_batch_size * self.dims.dp_size)
        if problem:
            if not getattr(self, "_warned_val", False):
                self.log(f"[val] skipped: {problem}; prepare more data")
                self._warned_val = True
            return None
        val = make_loader(self.manifest, self.cfg, "val", self.dims.dp_rank, self.dims.dp_size)
        return self.engine.evaluate(itertools.islice(iter(val), self.cfg.train.val_batches))

    def run(self) -> int:
        stop = StopRequest()
        self.resume()  # before the loggers open metrics.jsonl (resume may truncate it)
        loggers = MetricLoggers(self.cfg, self.run_dir, self.cfg.train.steps, enabled=self.is_main)
        self.log(f"[train] {self.n_params:,} parameters, {self.world} process(es), layout "
                 f"dp={self.layout.dp_size} (replicate {self.layout.dp_replicate} x shard "
                 f"{self.layout.dp_shard}) x cp={self.layout.cp} x tp={self.layout.tp} x pp={self.layout.pp}, "
                 f"grad accumulation {self.layout.grad_accum}, "
                 f"{self.tokens_per_step:,} tokens/step, engine {self.engine.name}")
        try:
            return self._loop(stop, loggers)
        finally:  # no collective here: on an error the other ranks may be gone
            loggers.close()
            stop.restore()

    def _loop(self, stop: StopRequest, loggers: MetricLoggers) -> int:
        cfg, p = self.cfg, self.progress
        stream = forever(self.loader)
        peak = device_peak_flops(self.device)
        meter = Throughput()
        last_saved = p.step
        while p.step < cfg.train.steps:
            if cfg.train.stop_at and p.step >= cfg.train.stop_at:
                self.log(f"[train] train.stop_at={cfg.train.stop_at} reached: saving and exiting "
                         "(run again without it to continue)")
                if p.step != last_saved:
                    self.save()
                self.ckpt.wait()
                return 0
            if stop.should_stop(self.device):
                # Never a checkpoint at step 0: a fresh start is the exact resume, while saving
                # before the first step makes DCP's get_state_dict take a zero-grad optimizer step
                # (AdamW's step counter 1) and the resumed run then differs from an uninterrupted one.
                save = p.step != last_saved or (p.step > 0 and not ckpt.list_checkpoints(self.ckpt.root))
                self.log(f"[train] stop signal received: {'saving' if save else 'nothing new to save'} "
                         f"at step {p.step}, exiting with code {EXIT_PREEMPTED} (requeue to resume)")
                if save:
                    self.save()
                self.ckpt.wait()
                return EXIT_PREEMPTED
            micro = [next(stream) for _ in range(self.layout.grad_accum)]
            log_now = (p.step + 1) % cfg.logging.interval == 0 or p.step + 1 == cfg.train.steps
            with self.memory.attached() if log_now else contextlib.nullcontext():
                result = self.engine.train_step(micro)
            memory_metrics = self.memory.metrics() if log_now else {}
            p.step += 1
            p.tokens += self.tokens_per_step
            meter.add(self.tokens_per_step)
            if result.finite:
                p.bad_in_a_row = 0
            else:
                p.bad_in_a_row += 1
                p.skipped += 1
                self.log(f"[train] step {p.step}: non-finite loss {result.loss} or gradient norm "
                         f"{result.grad_norm}; update skipped ({p.bad_in_a_row} in a row, "
                         f"{p.skipped} total); {self._locate_nonfinite(micro)}")
                if p.bad_in_a_row >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"{p.bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                        f"{cfg.train.max_bad_steps}) at step {p.step}: lower optim.lr, check the data, "
                        "or resume from an earlier checkpoint")
            if log_now:
                tps, step_time = meter.read()
                loggers.log({"step": p.step, "loss": result.loss, "lr": result.lr,
                             "grad_norm": result.grad_norm, "tokens": p.tokens, "tokens_per_s": tps,
                             "mfu": mfu(self.flops_token, tps, self.world, peak),
                             "step_time": step_time, "skipped_steps": p.skipped,
                             **({} if result.cp_idle is None else {"cp_idle": result.cp_idle}),
                             **source_tokens(self.manifest, self.loader, cfg.data.seq_len),
                             **memory_metrics})
            if cfg.train.val_interval and p.step % cfg.train.val_interval == 0 and p.step < cfg.train.steps:
                val = self.validate()
                if val is not None:
                    loggers.log({"step": p.step, "val_loss": val})
            if cfg.checkpoint.interval and p.step % cfg.checkpoint.interval == 0:
                self.save()
                last_saved = p.step
        self.ckpt.wait()
        val = self.validate()
        if val is not None:
            loggers.log({"step": p.step, "val_loss": val})
        if cfg.checkpoint.save_at_end and p.step != last_saved:
            self.save()
        self.ckpt.wait()
        self.sample()
        self.log(f"[train] done: {p.step} steps, {p.tokens:,} tokens. Run folder: {self.run_dir.resolve()} "
                 f"(metrics.jsonl, config.yaml, checkpoints/latest)")
        return 0

    def _locate_nonfinite(self, micro: list[dict]) -> str:
        """Run the step's micro-batches forward again with locating monitors: where did it start?"""
        with self.memory.attached(locate=True):
            self.engine.evaluate(micro)
        return self.memory.nonfinite_report()

    def sample(self) -> str | None:
        """Greedy continuation of `train.sample_prompt` (every rank runs it: FSDP forward is collective)."""
        if self.cfg.train.sample_tokens == 0:
            return None
        from titans_pretrain.data.tokenizer import Tokenizer

        tok = Tokenizer(self.manifest.tokenizer_path)
        ids = torch.tensor([tok.encode(self.cfg.train.sample_prompt)], device=self.device)
        with torch.no_grad():
            out = self.engine.generate(ids, self.cfg.train.sample_tokens)
        if out is None:
            self.log("[sample] skipped: generation runs on one device; sample from "
                     "titans_pretrain.load_checkpoint(run_dir) instead")
            return None
        text = self.cfg.train.sample_prompt + tok.decode(out[0].tolist())  # generate returns new tokens
        if self.is_main:
            (self.run_dir / "sample.txt").write_text(text)
            self.log(f"[sample] {text!r}")
        return text


def train(cfg: RunConfig) -> int:
    """Run one training job in this process (a rank of a launched group, or alone). The run
    folder's lock is held from the start until this returns, also when the start fails. A refusal
    or failure that every rank reaches is printed once, by rank 0, without a traceback."""
    lock = RunLock(cfg.run_dir)

    def say(msg: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(msg, flush=True)

    try:
        return Trainer(cfg, lock).run()
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
