"""DeepSpeed ZeRO engine (`parallel.engine=deepspeed`): stage 1/2/3, optional CPU offload.

Same model, data, loop and checkpoint bookkeeping as the native engine; DeepSpeed owns the sharded
optimizer and writes its own checkpoint files inside our atomic step folder. Two CPU traps are
avoided here (see docs/training.md): the shared-memory comm op that `init_distributed` JIT-compiles
for minutes is disabled, and the optimizer is a plain `torch.optim.AdamW` (FusedAdam and DeepSpeed's
CPU Adam compile C++ on first use).

Loss and LR schedule are ours (the scheduler wraps the client optimizer, whose param groups ZeRO
keeps), so both engines follow the same schedule. Non-finite steps: ZeRO 1/2 skip the update by
themselves when the gradient norm is not finite; ZeRO-3 only does so in fp16, so there a
non-finite step is detected, counted and aborts after `train.max_bad_steps`, but not skipped.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from titans_pretrain.config import RunConfig
from titans_pretrain.distributed.mesh import ParallelDims
from titans_pretrain.distributed.parallelize import apply_activation_checkpointing
from titans_pretrain.distributed.meta_init import replay_start
from titans_pretrain.distributed.precision import use_bf16
from titans_pretrain.models import TitansLM
from titans_pretrain.train.checkpoint import DEEPSPEED_TAG, UNIVERSAL, listed_in_manifest
from titans_pretrain.train.engines.base import StepResult, mean_over_dp
from titans_pretrain.train.optim import (build_optimizer, build_scheduler, optimizer_settings,
                                         restore_schedule)

TAG = DEEPSPEED_TAG


def build_partitioned(cfg: RunConfig, dims: ParallelDims, device: torch.device) -> nn.Module:
    """ZeRO-3's partitioned start: the model built inside ``deepspeed.zero.Init`` (each rank keeps
    only its partition of every parameter), then filled, one gathered parameter at a time, with the
    weights of an eager start with the same seed (``meta_init.replay_start``). Call after seeding."""
    deepspeed = _import_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl", verbose=False)
    rng = torch.get_rng_state()
    # dtype from the config (bf16 under mixed precision, as deepspeed.initialize would cast an eager
    # model): an explicit dtype reads as bf16 on a CPU in this DeepSpeed
    with deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, dims, device)):
        model = TitansLM(cfg.model, init=False)
    torch.set_rng_state(rng)  # the replay below draws what the constructors drew, from the same state

    def copy(param: torch.Tensor, values: torch.Tensor) -> None:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                param.data.copy_(values)

    replay_start(model, lambda: TitansLM(cfg.model, init=False), lambda m: m.reset_parameters(), copy)
    return model


def _import_deepspeed():
    try:
        import deepspeed
        import deepspeed.comm.torch  # noqa: F401  (registers the module patched below)
    except ImportError as exc:
        raise RuntimeError("parallel.engine=deepspeed needs DeepSpeed: pip install "
                           "'titans-pretrain[deepspeed]' (or use parallel.engine=native)") from exc
    # `import deepspeed.comm.torch as m` would bind torch itself; the module is in sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def ds_config(cfg: RunConfig, dims: ParallelDims, device: torch.device) -> dict:
    layout, p = dims.layout, cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.micro_batch_size * layout.grad_accum * layout.dp_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload with torch AdamW: no CPUAdam C++ build
        "bf16": {"enabled": use_bf16(cfg, device)},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: RunConfig, dims: ParallelDims, device: torch.device):
        if cfg.parallel.activation_checkpointing or cfg.parallel.compile:
            if cfg.parallel.activation_checkpointing:
                apply_activation_checkpointing(model)
            if cfg.parallel.compile:
                for block in model.blocks:
                    block.compile()
        deepspeed = _import_deepspeed()
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl",
                                   verbose=False)
        self.cfg, self.dims, self.device = cfg, dims, device
        optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        self._settings = optimizer_settings(self.scheduler.optimizer)  # this run's, kept on resume
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(cfg, dims, device))
        self.model = self.engine

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def named_parameters(self):
        """(name, parameter) of the model; under ZeRO-3 each holds its partition in `ds_tensor`."""
        return self.engine.module.named_parameters()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _loss(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        return self.engine(ids, labels=labels).loss

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        total = torch.zeros((), device=self.device)
        lr = self.lr
        self.engine.train()
        for batch in micro_batches:
            loss = self._loss(batch)
            self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
            total += loss.detach().float()
            self.engine.step()  # the optimizer steps at the accumulation boundary only
        self.scheduler.step()
        loss = mean_over_dp(total / len(micro_batches), self.dims)
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        finite = bool(torch.isfinite(loss).item()) and norm == norm and norm != float("inf")
        return StepResult(float(loss), norm, finite, lr)

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        self.engine.eval()
        total, count = torch.zeros((), device=self.device), 0
        for batch in batches:
            total += self._loss(batch).float()
            count += 1
        self.engine.train()
        return float(mean_over_dp(total / max(1, count), self.dims))

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        self.engine.eval()
        out = self.engine.module.generate(ids, max_new_tokens)
        self.engine.train()
        return out

    # ------------------------------------------------------------------ checkpoint I/O
    def save(self, folder: Path, async_save: bool = False):
        # universal_checkpoint_info lets `ds_to_universal` convert it for another DP size later
        self.engine.save_checkpoint(str(folder), tag=TAG,
                                    client_state={"universal_checkpoint_info": {}}, save_latest=False)
        return None

    def load(self, folder: Path, dp_size_saved: int | None = None) -> None:
        """Load a checkpoint; one written on another data-parallel size goes through DeepSpeed's
        universal checkpoint, which re-partitions weights and optimizer state: the one stored in
        the checkpoint by `tools/checkpoint.py reshard` when its manifest lists it, else converted
        now (`ds_to_universal`, by rank 0, into a temporary folder beside the checkpoint, removed
        after loading)."""
        if dp_size_saved is None:
            meta = folder / "trainer.json"
            dp_size_saved = json.loads(meta.read_text()).get("dp_size") if meta.is_file() else None
        if dp_size_saved in (None, self.dims.dp_size):
            path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {folder}/{TAG}")
            return
        rank = torch.distributed.get_rank()
        if listed_in_manifest(folder, UNIVERSAL):
            if rank == 0:
                print(f"[checkpoint] {folder.name}: loading its universal form, prepared offline", flush=True)
            self._load_universal(folder / UNIVERSAL)
        else:
            universal = folder.parent / f".{folder.name}.universal"
            error, message = torch.zeros(1), ""
            if rank == 0:
                print(f"[checkpoint] {folder.name}: converting to DeepSpeed's universal form for another "
                      "data-parallel size (`python tools/checkpoint.py reshard` does it once, offline)", flush=True)
                shutil.rmtree(universal, ignore_errors=True)
                try:
                    convert_to_universal(folder, universal)
                except RuntimeError as exc:
                    error += 1
                    message = str(exc)
            torch.distributed.all_reduce(error)
            if error.item():
                if rank == 0:
                    shutil.rmtree(universal, ignore_errors=True)
                raise RuntimeError(message if rank == 0 else f"ds_to_universal failed on {folder / TAG} "
                                   "(rank 0 says why)")
            try:
                self._load_universal(universal)
            finally:
                torch.distributed.barrier()
                if rank == 0:
                    shutil.rmtree(universal, ignore_errors=True)

    def _load_universal(self, universal: Path) -> None:
        self.engine._config.load_universal_checkpoint = True  # read at load time only
        try:
            path, _ = self.engine.load_checkpoint(str(universal), tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the universal form in {universal}")
        # ZeRO-3's universal load gives every sub-group's state one shared `step` tensor; AdamW
        # increments it in place once per sub-group, so the bias correction would run ahead.
        for state in self.scheduler.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict) -> None:
        restore_schedule(self.scheduler, state, self._settings)


def convert_to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint of the step folder `folder`, written to `out` (its
    `ds_to_universal`, in a child process): weights and optimizer state per parameter, which any
    data-parallel size loads."""
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(folder / TAG), "--output_folder", str(out / TAG),
                           "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"ds_to_universal failed on {folder / TAG}: {tail[0]}")
