"""Atomic, verified, sharded checkpoints and auto-resume.

Layout of `run_dir/checkpoints/`:

    step_00000100/          a complete checkpoint (never written in place)
        .metadata, *.distcp     DCP shards of {"model", "optim"} (native engine), or DeepSpeed's files
        extra/rank_00000.json   per-rank state: loader, RNGs, scheduler, trainer counters (JSON,
                                no pickle; older `rank_*.pt` files load with `weights_only=True`)
        trainer.json            step, tokens, world/dp sizes, engine, the run's id
        config.yaml             the run config (so the checkpoint alone rebuilds the model)
        MANIFEST.json           written last: every file with its size and CRC32
    step_00000200.tmp/      a save in progress (or killed mid-way): ignored, removed at the next start
    latest                  text file naming the newest complete checkpoint, updated last

A checkpoint is complete iff MANIFEST.json exists and every file matches it. Saving writes into
`*.tmp`, writes the manifest, renames the folder, then updates `latest`, then prunes; so a crash at
any moment leaves the previous complete checkpoint untouched, and nothing is deleted before a newer
checkpoint is complete. Pruning counts only verified checkpoints of this run (``run.json`` in the run
folder names it; a checkpoint records it in ``trainer.json``) and never the one just saved, so
neither a corrupt folder nor another run's outranks a new save. Resume walks from the newest folder
down and takes the first that verifies, reporting the ones it skips; every reader
(:func:`resolve_checkpoint_path`) does the same with CRC32 checks by default.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import sys
import time
import uuid
import warnings
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

from titans_pretrain.config import (CheckpointConfig, ConfigError, RunConfig, load_config, resolve_layout,
                                    save_config)
from titans_pretrain.config.model import LEGACY_DEFAULTS
from titans_pretrain.models import TitansLM
from titans_pretrain.train.data import ensure_dataset, make_loader
from titans_pretrain.train.optim import build_optimizer, build_scheduler

MANIFEST = "MANIFEST.json"
RUN_FILE = "run.json"  # in the run folder: the run's identity
STEP_PREFIX = "step_"
DEEPSPEED_TAG = "ds"  # DeepSpeed's files of a step folder are under this tag
UNIVERSAL = "universal"  # a DeepSpeed checkpoint's universal form, added offline (tools/checkpoint.py reshard)


class ResumeError(RuntimeError):
    """A checkpoint exists but cannot continue this run (engine, layout, data stream or the run
    folder's history differ)."""


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, quota, I/O): the previous checkpoint is untouched."""


class CorruptCheckpointError(FileNotFoundError):
    """A named checkpoint fails verification."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(folder: Path) -> int:
    return int(folder.name[len(STEP_PREFIX):])


def read_run_id(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def write_run_id(run_dir: str | Path, run_id: str) -> None:
    path = Path(run_dir) / RUN_FILE
    if read_run_id(run_dir) != run_id:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"run_id": run_id}) + "\n")
        os.replace(tmp, path)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


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


def _entries(folder: Path, under: Path) -> dict:
    """Manifest entries (size, CRC32) of the files under `under`, synced to disk first."""
    files = {}
    for p in sorted(under.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "crc32": _crc32(p)}
    return files


def write_manifest(folder: Path) -> None:
    _write_manifest(folder, _entries(folder, folder))


def add_to_manifest(folder: Path, sub: str) -> None:
    """List the files under `folder/sub`, added to a complete checkpoint, in its manifest too (the
    other entries are kept as they are: a file that went bad since still fails)."""
    files = json.loads((folder / MANIFEST).read_text())["files"]
    _write_manifest(folder, {**files, **_entries(folder, folder / sub)})


def listed_in_manifest(folder: Path, sub: str) -> bool:
    """Whether the manifest lists files under `folder/sub` (a later addition that finished)."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return any(rel.startswith(sub + "/") for rel in files)


def _write_manifest(folder: Path, files: dict) -> None:
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
    return check_metadata(folder)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle that torch reads with plain `pickle.load`. It only ever
    names DCP's metadata classes, torch sizes, dtypes and layouts, and paths; anything else (a
    callable such as `os.system`) means the file was crafted, and is refused before torch reads it."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")

    def find_class(self, module: str, name: str):
        allowed = (module in self._MODULES and not name.startswith("__")
                   or (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                                         ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                                         ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                                         ("collections", "OrderedDict"), ("builtins", "set"),
                                         ("builtins", "frozenset"), ("builtins", "slice")}
                   or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which DCP metadata never "
                                         "holds (a crafted file?)")
        return super().find_class(module, name)


def check_metadata(folder: Path) -> str | None:
    """None when the folder's DCP `.metadata` (if any) holds only what DCP writes, else why not."""
    path = folder / ".metadata"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as exc:  # noqa: BLE001 - any failure means torch must not read it
        return f".metadata refused: {exc}"
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


def resolve_checkpoint_path(path: str | Path, mode: str = "hash",
                            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """A step folder, a `checkpoints/` folder or a run folder -> the checkpoint folder to read.

    Verified (CRC32 of every file by default): a named step folder that fails is an error naming
    the newest intact one beside it; from a run or `checkpoints/` folder the newest intact one is
    taken, and each newer one skipped is reported through `log`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a run folder, its checkpoints/ folder "
                                "or a step folder (RUN/checkpoints/step_N)")
    if (path / MANIFEST).is_file() or (path / "trainer.json").is_file():
        reason = verify_checkpoint(path, mode)
        if reason is not None:
            intact = find_latest_complete(path.parent, mode, log=lambda m: None)
            alt = f"; the newest intact checkpoint beside it is {intact}" if intact else ""
            raise CorruptCheckpointError(f"{path}: {reason}{alt}")
        return path
    for root in (path, path / "checkpoints"):
        if list_checkpoints(root):
            found = find_latest_complete(root, mode, log=log)
            if found is None:
                raise CorruptCheckpointError(f"no intact checkpoint under {root}: every one fails "
                                             "verification (see the lines above)")
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


def _rng_to_json(state: dict) -> dict:
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {"python": [version, list(internal), gauss],
           "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "torch": state["torch"].tolist()}
    if "cuda" in state:
        out["cuda"] = state["cuda"].tolist()
    return out


def _rng_from_json(state: dict) -> dict:
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {"python": (version, tuple(internal), gauss),
           "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
           "torch": torch.tensor(state["torch"], dtype=torch.uint8)}
    if "cuda" in state:
        out["cuda"] = torch.tensor(state["cuda"], dtype=torch.uint8)
    return out


def write_extra(folder: Path, rank: int, extra: dict) -> None:
    """This rank's state (loader, RNGs, scheduler, counters) as JSON: no pickle, exact floats."""
    state = dict(extra, rng=_rng_to_json(extra["rng"])) if "rng" in extra else extra
    (folder / "extra" / f"rank_{rank:05d}.json").write_text(json.dumps(state))


def _load_legacy_extra(path: Path) -> dict:
    """A `rank_*.pt` of older checkpoints, read with `weights_only=True`: besides tensors and
    containers it holds only numpy's RNG key array, whose three classes are allowed here."""
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------------ saved state
@dataclass
class Progress:
    """The training counters: a checkpoint holds them, resume restores them as they were."""

    step: int = 0
    tokens: int = 0
    bad_in_a_row: int = 0  # non-finite steps in a row (their updates were skipped)
    skipped: int = 0  # non-finite steps in all

    @classmethod
    def from_extra(cls, extra: dict) -> "Progress":
        return cls(**{f.name: extra[f.name] for f in fields(cls)})


@dataclass
class Placement:
    """Where the saving rank sits: a resume compares it with its own to know what it reads."""

    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    world_size: int = 1
    engine: str = "native"
    layout: dict | None = None  # the resolved layout; None where the writer had none (an import)


# ------------------------------------------------------------------------------------------ manager
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Engine-agnostic atomic save/prune/resume; the engine supplies `write(tmp_dir)`.

    `run_id` is this run's identity: it goes into every checkpoint it saves, and pruning counts
    only checkpoints carrying it (or none: checkpoints written before runs had one)."""

    def __init__(self, root: str | Path, cfg: CheckpointConfig, log: Callable[[str], None] = print,
                 run_id: str | None = None):
        self.root = Path(root)
        self.cfg = cfg
        self.log = log
        self.run_id = run_id
        self._pending: dict | None = None
        self._verified: dict[str, tuple[int, str | None]] = {}  # name -> (manifest mtime, reason)

    # ---------------------------------------------------------------- save
    def save(self, step: int, write: Callable[[Path], Any], extra: dict, meta: dict,
             config_text: str) -> None:
        """Collective. `write(tmp)` writes the engine's shards (may return a future for async).

        A failed write (disk full, quota, I/O error on any rank) removes the unfinished folder and
        raises :class:`CheckpointSaveError` on every rank; the previous checkpoint is untouched."""
        self.wait()  # at most one save in flight
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_unfinished()
            (tmp / "extra").mkdir(parents=True)
        _barrier()
        error, future = None, None
        try:
            future = write(tmp)
            write_extra(tmp, _rank(), extra)
            if _rank() == 0:
                (tmp / "trainer.json").write_text(json.dumps(dict(meta, run_id=self.run_id), indent=1))
                (tmp / "config.yaml").write_text(config_text)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - every rank hears of it
            error = exc
        self._agree_or_raise(error, tmp, step)
        self._pending = {"future": future, "tmp": tmp, "final": final, "step": step}
        if future is None or not self.cfg.async_save:
            self.wait()

    def save_state(self, progress: Progress, *, weights: Callable[[Path], Any], loader_state: dict,
                   scheduler_state: dict, placement: Placement, config: RunConfig,
                   imported_from: str | None = None) -> None:
        """Collective. The one definition of what a checkpoint holds: the components hand their
        state (the engine its writer of weights and optimizer, the loader its position, the
        scheduler its state, the trainer its counters), this adds the RNGs, the run config and the
        record in ``trainer.json``, and saves them atomically (:meth:`save`)."""
        extra = {"rank": placement.rank, "dp_rank": placement.dp_rank, "dp_size": placement.dp_size,
                 "loader": loader_state, "rng": rng_state(), "scheduler": scheduler_state,
                 **asdict(progress)}
        meta = {"step": progress.step, "tokens": progress.tokens, "world_size": placement.world_size,
                "dp_size": placement.dp_size, "engine": placement.engine, "layout": placement.layout,
                "time": time.time(), **({"imported_from": imported_from} if imported_from else {})}
        self.save(progress.step, weights, extra, meta, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def _agree_or_raise(self, error: BaseException | None, tmp: Path, step: int) -> None:
        """All ranks learn whether any rank's write failed; if one did, all raise the same error."""
        failed = [error is not None]
        if dist.is_initialized() and dist.get_world_size() > 1:  # objects: any backend, any device
            failed = [None] * dist.get_world_size()
            dist.all_gather_object(failed, error is not None)
        if not any(failed):
            return
        _barrier()
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(self._save_failure(error, step)) from error

    def _save_failure(self, error: BaseException | None, step: int) -> str:
        previous = self.root / "latest"
        kept = previous.read_text().strip() if previous.is_file() else "none yet"
        if isinstance(error, CheckpointException):  # DCP's wrapper of each failed rank's error
            error = next(iter(error.failures.values()))[0]
        if error is None:
            cause = "another rank's write failed (its log names the cause)"
        else:
            cause = f"{type(error).__name__}: {error}"
            code = getattr(error, "errno", None)
            detail = None
            if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                detail = os.strerror(code)
            elif "unexpected pos" in str(error):  # torch's writer after a short write
                detail = "a short write: a full disk, a quota or a file-size limit"
            if detail is not None:
                free = shutil.disk_usage(self.root).free
                cause = (f"the filesystem refused the write ({detail}; {free / 2**30:.2f} GiB free "
                         f"under {self.root})")
        return (f"saving the checkpoint of step {step} failed: {cause}. The unfinished folder was "
                f"removed; the newest checkpoint ({kept}) is intact. Free space (or lower "
                "checkpoint.keep_last) and run again: it resumes from there")

    def remove_unfinished(self) -> None:
        """Rank 0: remove `*.tmp` folders of saves that were killed (they hold disk space)."""
        for stale in self.root.glob(f"{STEP_PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def wait(self) -> None:
        """Finish the pending save: manifest, rename, `latest`, prune (collective)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        error = None
        try:
            if pending["future"] is not None and hasattr(pending["future"], "result"):
                pending["future"].result()
        except (Exception, CheckpointException) as exc:  # noqa: BLE001
            error = exc
        self._agree_or_raise(error, pending["tmp"], pending["step"])
        _barrier()
        if _rank() == 0:
            self._finalize(pending["tmp"], pending["final"], pending["step"])
        _barrier()

    def _finalize(self, tmp: Path, final: Path, step: int) -> None:
        try:
            write_manifest(tmp)
        except OSError as exc:  # rank 0 alone here: the others wait at the barrier after
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveError(self._save_failure(exc, step)) from exc
        if final.exists():  # a re-save of the same step (resumed at the end): replace atomically
            old = final.with_name(final.name + ".old.tmp")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)
        self._verified[final.name] = ((final / MANIFEST).stat().st_mtime_ns, None)  # its CRCs are fresh
        latest_tmp = self.root / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, self.root / "latest")
        _fsync_dir(self.root)
        self.log(f"[checkpoint] saved {final}")
        self.prune(keep=final)

    def _verify_once(self, folder: Path) -> str | None:
        """`verify_checkpoint`, remembered per folder (until its manifest changes)."""
        manifest = folder / MANIFEST
        mtime = manifest.stat().st_mtime_ns if manifest.is_file() else -1
        cached = self._verified.get(folder.name)
        if cached is None or cached[0] != mtime:
            cached = (mtime, verify_checkpoint(folder, self.cfg.verify))
            self._verified[folder.name] = cached
        return cached[1]

    def _is_ours(self, folder: Path) -> bool:
        try:
            run_id = read_meta(folder).get("run_id")
        except (OSError, ValueError):
            return False
        return run_id is None or run_id == self.run_id

    def prune(self, keep: Path | None = None) -> None:
        """Keep the newest `keep_last` verified checkpoints of this run plus every `keep_every`-th,
        and always `keep` (the one just saved). Corrupt folders and other runs' are not counted
        and not touched: they never push a good checkpoint out."""
        counted = []
        for p in list_checkpoints(self.root):
            if p == keep:
                counted.append(p)
            elif not self._is_ours(p):
                continue
            elif (reason := self._verify_once(p)) is None:
                counted.append(p)
            else:
                self.log(f"[checkpoint] prune: not counting {p.name} ({reason}); left in place")
        for p in counted[self.cfg.keep_last:]:
            if p == keep or (self.cfg.keep_every and step_of(p) % self.cfg.keep_every == 0):
                continue
            shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------- resume
    def find_resume(self) -> Path | None:
        """The checkpoint this run continues from, or None to start afresh. Same answer on every
        rank (rank 0 decides, then broadcasts); a run folder whose history the choice would mix
        raises :class:`ResumeError` on every rank."""
        choice: list = [None]
        if _rank() == 0:
            try:
                found = self._choose_resume()
                choice[0] = str(found) if found else None
            except ResumeError as exc:
                choice[0] = ("error", str(exc))
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], (tuple, list)):
            raise ResumeError(choice[0][1])
        return Path(choice[0]) if choice[0] else None

    def _choose_resume(self) -> Path | None:
        existing = list_checkpoints(self.root)
        resume = self.cfg.resume
        if resume == "none":
            if existing:
                raise ResumeError(
                    f"checkpoint.resume=none, but {self.root} already holds checkpoints (newest "
                    f"{existing[0].name}): a second run there would prune and resume the first "
                    "one's saves. Use a new run_dir, continue this run (checkpoint.resume=auto), or "
                    f"move {self.root} away")
            return None
        if resume == "auto":
            found = find_latest_complete(self.root, self.cfg.verify, self.log)
            if found is None and existing:
                raise ResumeError(
                    f"none of the {len(existing)} checkpoint(s) under {self.root} is intact (see "
                    "above): starting at step 0 beside them would mix two runs. Restore them, move "
                    "them away to start afresh, or name one with checkpoint.resume=FOLDER")
            return found
        try:
            folder = resolve_checkpoint_path(resume, self.cfg.verify, log=self.log)
        except FileNotFoundError as exc:
            raise ResumeError(f"checkpoint.resume={resume}: {exc}. It takes auto, none, or a "
                              "checkpoint (a step folder, or a run folder for its newest)") from None
        newer = [p.name for p in existing if step_of(p) > read_meta(folder)["step"]]
        if newer:
            raise ResumeError(
                f"checkpoint.resume={folder} goes back to step {read_meta(folder)['step']}, but "
                f"{self.root} holds later checkpoints ({', '.join(newer)}): training on here would "
                "leave two histories in one folder, and the later ones would win the next resume. "
                "Move the later ones away (a rollback), or resume into a new run_dir")
        return folder


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "trainer.json").read_text())


def load_extras(folder: Path) -> list[dict]:
    """Every rank's extra state, in rank order (JSON, or an older checkpoint's `rank_*.pt`)."""
    found = sorted((folder / "extra").glob("rank_*.json"))
    if found:
        out = []
        for f in found:
            state = json.loads(f.read_text())
            if "rng" in state:
                state["rng"] = _rng_from_json(state["rng"])
            out.append(state)
        return out
    return [_load_legacy_extra(f) for f in sorted((folder / "extra").glob("rank_*.pt"))]


# ------------------------------------------------------------------------------------------ one process
def checkpoint_config(folder: str | Path):
    """The run config saved in a checkpoint folder. A model key added after the checkpoint was
    written reads as the value the checkpoint was trained with (``LEGACY_DEFAULTS``: MAC's plain
    product output, no ``memory_out_norm`` weights; the bare memory rule, no surprise clip)."""
    path = Path(folder) / "config.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    saved = (raw.get("model") or {}) if isinstance(raw, dict) else {}
    return load_config(path, [f"model.{k}={v}" for k, v in LEGACY_DEFAULTS.items() if k not in saved])


def load_checkpoint(path: str | Path):
    """Any checkpoint (native DCP of any layout, or DeepSpeed ZeRO) -> a `TitansLM` in this process.

    `path` may be a step folder, a `checkpoints/` folder or a run folder (newest complete one)."""
    folder = resolve_checkpoint_path(path)
    cfg = checkpoint_config(folder)
    model = TitansLM(cfg.model)
    meta = read_meta(folder)
    if meta.get("engine") == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    else:
        state = {"model": model.state_dict()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(folder), no_dist=True)
        state = state["model"]
    model.load_state_dict(state)
    model.eval()
    return model


def write_start_checkpoint(model, cfg: RunConfig, run_dir: str | Path, *, source: str,
                           log: Callable[[str], None] = print) -> Path:
    """Write ``model`` (a ``TitansLM`` matching ``cfg.model``, weights from elsewhere: a Hugging
    Face folder, a Megatron checkpoint) as ``run_dir/checkpoints/step_00000000`` with a fresh
    optimizer, schedule and data position, and ``run_dir/config.yaml``: a checkpoint ``train``
    resumes from like any native one. ``source`` is recorded as ``imported_from``."""
    run_dir = Path(run_dir)
    if cfg.parallel.engine != "native":
        raise ConfigError("the reverse conversion writes a native-engine checkpoint; set parallel.engine=native "
                          "(DeepSpeed resumes only its own ZeRO files)")
    root = run_dir / "checkpoints"
    if list_checkpoints(root):
        raise FileExistsError(f"{root} already holds checkpoints; `train` would resume from the newest of "
                              "them, not from this import: choose a new run_dir")
    manifest = ensure_dataset(cfg, log=log)
    # the stream's position is layout-free: the global batch alone fixes it (any dp size resumes it)
    loader = make_loader(manifest, cfg, "train", 0, 1,
                         global_batch=cfg.train.global_batch_tokens // cfg.data.seq_len)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    msd, osd = get_state_dict(model, optimizer)
    try:
        layout = resolve_layout(cfg, 1).__dict__
    except ConfigError:  # a multi-process layout: the resuming run resolves its own
        layout = None
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    run_id = new_run_id()  # the run that `train` continues: its checkpoints carry this id
    write_run_id(run_dir, run_id)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))

    CheckpointManager(root, cfg.checkpoint, log=log, run_id=run_id).save_state(
        Progress(), weights=write, loader_state=loader.state_dict(), scheduler_state=scheduler.state_dict(),
        placement=Placement(layout=layout), config=cfg, imported_from=source)
    return root / step_dir_name(0)
