"""Checkpoints in training: the run folder's identity, the resume (checked before anything is
written, loaded at the start) and the saves (every `checkpoint.interval` steps, when the run stops
early, at the end). What a checkpoint holds is the checkpointer's (`CheckpointManager.save_state`);
this callback hands it each component's state."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from titans_pretrain.config import RunConfig, save_config
from titans_pretrain.train import checkpoint as ckpt
from titans_pretrain.train.callbacks.base import Callback
from titans_pretrain.train.data import make_loader
from titans_pretrain.train.resume_rules import FIXED_ON_RESUME, config_changes, parameter_differences


class Checkpointing(Callback):
    def __init__(self, cfg: RunConfig, manager: ckpt.CheckpointManager, *, manifest, loader, dims, layout,
                 rank: int, world: int, log):
        self.cfg, self.manager, self.manifest, self.loader = cfg, manager, manifest, loader
        self.dims, self.layout, self.rank, self.world, self.log = dims, layout, rank, world, log
        self.resume_from = manager.find_resume()
        self.extras: list[dict] | None = None
        self.last_saved = 0

    # -------------------------------------------------------------- before anything is written
    def check_resumable(self) -> None:
        """Config changes on resume follow one rule. What the checkpoint's state cannot follow
        (parameter shapes, the variant, the engine, the data stream: dataset, tokenizer, sequence
        length, batch, seed) is refused here, before anything is written, naming each difference.
        Everything else (learning rate and schedule, optimizer settings, steps, logging, intervals,
        the memory's clip or kernels) takes effect, and the log lists it."""
        folder = self.resume_from
        if folder is None:
            return
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
                self.extras = ckpt.load_extras(folder)
            except Exception as exc:  # noqa: BLE001 - e.g. an old pickle that weights_only refuses
                raise ckpt.ResumeError(f"{folder}/extra cannot be read safely ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0]}); move the checkpoint away to "
                                       "resume from the one before") from exc
            try:
                self._place_loader(probe, meta, quiet=True)
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

    def record_run(self, run_dir: Path) -> None:
        """Rank 0 writes config.yaml and the run's identity (`run.json`: kept across resumes, new
        in a fresh folder) and removes saves that were killed mid-way; every rank learns the id."""
        run_id = [None]
        if self.rank == 0:
            adopted = None
            if self.resume_from is not None and self.resume_from.parent.resolve() == self.manager.root.resolve():
                adopted = ckpt.read_meta(self.resume_from).get("run_id")
            run_id[0] = ckpt.read_run_id(run_dir) or adopted or ckpt.new_run_id()
            save_config(self.cfg, run_dir / "config.yaml")
            ckpt.write_run_id(run_dir, run_id[0])
            self.manager.remove_unfinished()
        if self.world > 1:
            dist.broadcast_object_list(run_id, src=0)
        self.manager.run_id = run_id[0]

    # -------------------------------------------------------------- the run
    def on_start(self, trainer) -> None:
        self.resume(trainer)
        self.last_saved = trainer.progress.step

    def after_step(self, trainer, result, batch) -> None:
        interval = self.cfg.checkpoint.interval
        if interval and trainer.progress.step % interval == 0:
            self.save(trainer)

    def on_stop(self, trainer, code: int) -> None:
        # Never a checkpoint at step 0: a fresh start is the exact resume, while saving before the
        # first step makes DCP's get_state_dict take a zero-grad optimizer step (AdamW's step
        # counter 1) and the resumed run then differs from an uninterrupted one.
        step = trainer.progress.step
        if step != self.last_saved or (step > 0 and not ckpt.list_checkpoints(self.manager.root)):
            self.log(f"[checkpoint] saving at step {step} before exiting")
            self.save(trainer)
        else:
            self.log(f"[checkpoint] nothing new to save at step {step}")
        self.manager.wait()

    def on_end(self, trainer) -> None:
        self.manager.wait()
        if self.cfg.checkpoint.save_at_end and trainer.progress.step != self.last_saved:
            self.save(trainer)
        self.manager.wait()

    # -------------------------------------------------------------- save and resume
    def save(self, trainer) -> None:
        """A checkpoint of the current step, unless the state is suspect: never after a
        non-finite step, never with non-finite weights (the last good checkpoint stays `latest`)."""
        p, engine = trainer.progress, trainer.engine
        self.last_saved = p.step
        if p.bad_in_a_row or not self._weights_finite(trainer):
            self.log(f"[checkpoint] step {p.step}: not saved, "
                     + ("the last step was non-finite" if p.bad_in_a_row else "the weights are not finite")
                     + "; the newest good checkpoint stays latest")
            return
        placement = ckpt.Placement(rank=self.rank, dp_rank=self.dims.dp_rank, dp_size=self.dims.dp_size,
                                   world_size=self.world, engine=engine.name, layout=self.layout.__dict__)
        async_save = self.cfg.checkpoint.async_save
        self.manager.save_state(p, weights=lambda tmp: engine.save(tmp, async_save=async_save),
                                loader_state=self.loader.state_dict(),
                                scheduler_state=engine.scheduler_state(), placement=placement, config=self.cfg)

    def _weights_finite(self, trainer) -> bool:
        """Every rank's shard of every parameter is finite (agreed over all ranks)."""
        ok = torch.ones((), device=trainer.device)
        with torch.no_grad():
            for _, param in trainer.engine.named_parameters():
                local = getattr(param, "ds_tensor", None)  # a ZeRO-3 partition
                if local is None:
                    local = param.to_local() if hasattr(param, "to_local") else param
                if local.numel() and not bool(torch.isfinite(local).all()):
                    ok.zero_()
                    break
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def resume(self, trainer) -> None:
        """Load the checkpoint chosen (and checked) at start: weights, optimizer, data stream,
        RNGs, counters; the schedule and optimizer settings are this run's."""
        folder = self.resume_from
        if folder is None:
            return
        meta = ckpt.read_meta(folder)
        unchecked = " (checkpoint.verify=size does not read the data: use hash)" \
            if self.cfg.checkpoint.verify == "size" else ""
        try:
            trainer.engine.load(folder)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's is a BaseException
            inner = next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) else exc
            raise ckpt.ResumeError(f"{folder} cannot be read ({type(inner).__name__}: "
                                   f"{str(inner).splitlines()[0]}): it is corrupt{unchecked}; move it "
                                   "away to resume from the one before") from exc
        if not self._weights_finite(trainer):
            raise ckpt.ResumeError(f"{folder} holds non-finite weights: it is corrupt or was saved "
                                   f"after a divergence{unchecked}; move it away to resume from the "
                                   "one before")
        mine = self._place_loader(self.loader, meta)
        if mine is not None and meta["world_size"] == self.world:
            ckpt.set_rng_state(mine["rng"])
        trainer.engine.load_scheduler_state(self.extras[0]["scheduler"])
        trainer.progress = p = ckpt.Progress.from_extra(self.extras[0])
        self.log(f"[checkpoint] resumed from {folder} at step {p.step} ({p.tokens:,} tokens)")

    def _place_loader(self, loader, meta: dict, quiet: bool = False) -> dict | None:
        """Put `loader` where the checkpoint's stream stands and return this rank's extra state
        (None on another dp size: no rank's RNGs apply). The stream does not depend on the dp size,
        so any rank's loader state continues it exactly on any number of ranks."""
        extras = self.extras
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
