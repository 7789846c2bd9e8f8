"""Atomic, verified, sharded checkpoints and auto-resume.

Layout of `run_dir/checkpoints/`:

    step_00000100/          a complete checkpoint (never written in place)
        .metadata, *.distcp     DCP shards of {"model", "optim"} (native engine), or DeepSpeed's files
        extra/rank_00000.pt     per-rank state: loader, RNGs, scheduler, trainer counters
        trainer.json            step, tokens, world/dp sizes, engine
        config.yaml             the run config (so the checkpoint alone rebuilds the model)
        MANIFEST.json           written last: every file with its size and CRC32
    step_00000200.tmp/      a save in progress (or killed mid-way): ignored, removed by the next save
    latest                  text file naming the newest complete checkpoint, updated last

A checkpoint is complete iff MANIFEST.json exists and every file matches it. Saving writes into
`*.tmp`, writes the manifest, renames the folder, then updates `latest`, then prunes; so a crash at
any moment leaves the previous complete checkpoint untouched, and nothing is deleted before a newer
checkpoint is complete. Resume walks from the newest folder down and takes the first that verifies,
reporting the ones it skips.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from titans_pretrain.config import CheckpointConfig

MANIFEST = "MANIFEST.json"


class ResumeError(RuntimeError):
    """A checkpoint exists but cannot continue this run (engine, layout or data stream differ)."""

STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_manifest(folder: Path) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "crc32": _crc32(p)}
    tmp = folder / (MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def verify_checkpoint(folder: str | Path, mode: str = "hash") -> str | None:
    """None when `folder` is a complete, intact checkpoint, else the reason it is not."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable MANIFEST.json ({exc})"
    for rel, info in files.items():
        p = folder / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != info["size"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {info['size']} (truncated?)"
        if mode == "hash" and _crc32(p) != info["crc32"]:
            return f"{rel} fails its CRC32 check (corrupt)"
    return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished (renamed) checkpoint folders, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)


def find_latest_complete(root: str | Path, mode: str = "hash", log: Callable[[str], None] = print
                         ) -> Path | None:
    for folder in list_checkpoints(root):
        reason = verify_checkpoint(folder, mode)
        if reason is None:
            return folder
        log(f"[checkpoint] skipping {folder}: {reason}; trying the previous one")
    return None


def resolve_checkpoint_path(path: str | Path, mode: str = "size") -> Path:
    """A step folder, a `checkpoints/` folder or a run folder -> the checkpoint folder to read."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / "trainer.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if list_checkpoints(root):
            found = find_latest_complete(root, mode, log=lambda m: print(m, file=sys.stderr))
            if found is None:
                raise FileNotFoundError(f"no complete checkpoint under {root}")
            return found
    raise FileNotFoundError(f"{path} is not a checkpoint, a checkpoints/ folder or a run folder")


# ------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------ manager
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Engine-agnostic atomic save/prune/resume; the engine supplies `write(tmp_dir)`."""

    def __init__(self, root: str | Path, cfg: CheckpointConfig, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.cfg = cfg
        self.log = log
        self._pending: dict | None = None

    # ---------------------------------------------------------------- save
    def save(self, step: int, write: Callable[[Path], Any], extra: dict, meta: dict,
             config_text: str) -> None:
        """Collective. `write(tmp)` writes the engine's shards (may return a future for async)."""
        self.wait()  # at most one save in flight
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{STEP_PREFIX}*.tmp"):  # leftovers of killed saves
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / "extra").mkdir(parents=True)
        _barrier()
        future = write(tmp)
        torch.save(extra, tmp / "extra" / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
            (tmp / "config.yaml").write_text(config_text)
        self._pending = {"future": future, "tmp": tmp, "final": final, "step": step}
        if future is None or not self.cfg.async_save:
            self.wait()

    def wait(self) -> None:
        """Finish the pending save: manifest, rename, `latest`, prune (collective)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if pending["future"] is not None and hasattr(pending["future"], "result"):
            pending["future"].result()
        _barrier()
        if _rank() == 0:
            self._finalize(pending["tmp"], pending["final"], pending["step"])
        _barrier()

    def _finalize(self, tmp: Path, final: Path, step: int) -> None:
        write_manifest(tmp)
        if final.exists():  # a re-save of the same step (resumed at the end): replace atomically
            old = final.with_name(final.name + ".old.tmp")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)
        latest_tmp = self.root / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, self.root / "latest")
        _fsync_dir(self.root)
        self.log(f"[checkpoint] saved {final}")
        self.prune()

    def prune(self) -> None:
        """Keep the newest `keep_last` plus every `keep_every`-th; only complete ones count."""
        complete = [p for p in list_checkpoints(self.root) if (p / MANIFEST).is_file()]
        keep = set(complete[: self.cfg.keep_last])
        for p in complete[self.cfg.keep_last:]:
            step = int(p.name[len(STEP_PREFIX):])
            if self.cfg.keep_every and step % self.cfg.keep_every == 0:
                continue
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------- resume
    def find_resume(self) -> Path | None:
        """Same answer on every rank: rank 0 decides, then broadcasts."""
        choice: list = [None]
        if _rank() == 0:
            resume = self.cfg.resume
            if resume == "none":
                choice[0] = None
            elif resume == "auto":
                found = find_latest_complete(self.root, self.cfg.verify, self.log)
                choice[0] = str(found) if found else None
            else:
                reason = verify_checkpoint(resume, self.cfg.verify)
                if reason is not None:
                    choice[0] = ("error", f"checkpoint.resume={resume}: {reason}")
                else:
                    choice[0] = resume
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], (tuple, list)):
            raise ResumeError(choice[0][1])
        return Path(choice[0]) if choice[0] else None


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "trainer.json").read_text())


def load_extras(folder: Path) -> list[dict]:
    files = sorted((folder / "extra").glob("rank_*.pt"))
    return [torch.load(f, weights_only=False) for f in files]


# ------------------------------------------------------------------------------------------ one process
def checkpoint_config(folder: str | Path):
    """The run config saved in a checkpoint folder. A model key added after the checkpoint was
    written reads as the value the checkpoint was trained with (``LEGACY_DEFAULTS``: MAC's plain
    product output, no ``memory_out_norm`` weights; the bare memory rule, no surprise clip)."""
    import yaml

    from titans_pretrain.config import load_config
    from titans_pretrain.models.titans import LEGACY_DEFAULTS

    path = Path(folder) / "config.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    saved = (raw.get("model") or {}) if isinstance(raw, dict) else {}
    return load_config(path, [f"model.{k}={v}" for k, v in LEGACY_DEFAULTS.items() if k not in saved])


def load_checkpoint(path: str | Path):
    """Any checkpoint (native DCP of any layout, or DeepSpeed ZeRO) -> a `TitansLM` in this process.

    `path` may be a step folder, a `checkpoints/` folder or a run folder (newest complete one)."""
    from titans_pretrain.models import TitansLM

    folder = resolve_checkpoint_path(path)
    cfg = checkpoint_config(folder)
    model = TitansLM(cfg.model)
    meta = read_meta(folder)
    if meta.get("engine") == "deepspeed":
        from titans_pretrain.distributed.deepspeed_engine import load_fp32_model_state

        state = load_fp32_model_state(folder)
    else:
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(folder), no_dist=True)
        state = state["model"]
    model.load_state_dict(state)
    model.eval()
    return model
