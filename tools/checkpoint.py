"""Inspect and verify checkpoints without training anything.

    python tools/checkpoint.py inspect RUN_DIR|CHECKPOINTS_DIR|STEP_DIR     # what it holds
    python tools/checkpoint.py verify  RUN_DIR|CHECKPOINTS_DIR|STEP_DIR     # CRC32 of every file
    python tools/checkpoint.py reshard RUN_DIR|CHECKPOINTS_DIR|STEP_DIR     # for any layout, offline

`inspect` prints each checkpoint's step, tokens, engine, layout, run id, the model it holds and its
size on disk; `verify` checks every checkpoint of a run (or the one named) against its manifest,
as resume does, and exits 1 if any fails. Both read only.

`reshard` prepares a checkpoint (a run's newest intact one, or the one named) for a resume on any
layout, so the job that resumes does not pay for it. Native checkpoints need nothing: DCP reshards
them on load onto any layout. A DeepSpeed ZeRO checkpoint resumes on another data-parallel size
through DeepSpeed's universal form (`ds_to_universal`, minutes to hours for a large model): this
writes it once into the step folder (`universal/`) and adds it to the manifest, and every later
resume on another size loads it directly. The checkpoint is verified first and its files are not
changed; a reshard killed midway leaves the checkpoint as it was (the manifest lists the new files
last). Needs `deepspeed`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from titans_pretrain.train import checkpoint as ckpt  # noqa: E402


def checkpoints_of(path: Path) -> list[Path]:
    """A step folder -> itself; a run or checkpoints/ folder -> its step folders, newest first."""
    if (path / ckpt.MANIFEST).is_file() or (path / "trainer.json").is_file():
        return [path]
    for root in (path, path / "checkpoints"):
        found = ckpt.list_checkpoints(root)
        if found:
            return found
    raise SystemExit(f"error: {path} is not a checkpoint, a checkpoints/ folder or a run folder")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def inspect(path: Path) -> int:
    latest = None
    for folder in checkpoints_of(path):
        root = folder.parent
        if latest is None and (root / "latest").is_file():
            latest = (root / "latest").read_text().strip()
            print(f"{root}: latest -> {latest}")
        try:
            meta = ckpt.read_meta(folder)
        except (OSError, ValueError) as exc:
            print(f"{folder.name}: unreadable trainer.json ({exc})")
            continue
        model = ckpt.checkpoint_config(folder).model
        layout = meta.get("layout") or {}
        print(f"{folder.name}: step {meta['step']}, {meta.get('tokens', 0):,} tokens, engine "
              f"{meta.get('engine')}, {meta.get('world_size')} rank(s) (dp {meta.get('dp_size')}, "
              f"tp {layout.get('tp', 1)}, pp {layout.get('pp', 1)}, cp {layout.get('cp', 1)}), run "
              f"{meta.get('run_id') or '(none recorded)'}; model {model.variant} d_model {model.d_model} x "
              f"{model.n_layers} layers, {_size(folder) / 2**20:.1f} MiB"
              + (f"; imported from {meta['imported_from']}" if meta.get("imported_from") else ""))
    return 0


def verify(path: Path) -> int:
    bad = 0
    for folder in checkpoints_of(path):
        reason = ckpt.verify_checkpoint(folder, "hash")
        print(f"{folder}: {'ok' if reason is None else reason}")
        bad += reason is not None
    return 1 if bad else 0


def reshard(path: Path) -> int:
    import shutil

    try:
        folder = ckpt.resolve_checkpoint_path(path)  # verified (CRC32), or the newest intact one
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    engine = ckpt.read_meta(folder).get("engine", "native")
    if engine != "deepspeed":
        print(f"{folder}: a {engine} checkpoint (DCP) loads onto any layout as it is; nothing to prepare")
        return 0
    if ckpt.listed_in_manifest(folder, ckpt.UNIVERSAL):
        print(f"{folder}: its universal form is already prepared ({ckpt.UNIVERSAL}/)")
        return 0
    from titans_pretrain.train.engines.deepspeed import convert_to_universal

    work, done = folder / (ckpt.UNIVERSAL + ".tmp"), folder / ckpt.UNIVERSAL
    for stale in (work, done):  # left by a reshard that was killed before the manifest listed it
        shutil.rmtree(stale, ignore_errors=True)
    print(f"{folder}: converting to DeepSpeed's universal form ...", flush=True)
    try:
        convert_to_universal(folder, work)
    except RuntimeError as exc:
        shutil.rmtree(work, ignore_errors=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    work.rename(done)
    ckpt.add_to_manifest(folder, ckpt.UNIVERSAL)
    size = sum(p.stat().st_size for p in done.rglob("*") if p.is_file())
    print(f"{folder}: wrote {ckpt.UNIVERSAL}/ ({size / 2**20:.1f} MiB, in the manifest); a resume on any "
          "data-parallel size loads it directly")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["inspect", "verify", "reshard"])
    ap.add_argument("path", type=Path)
    args = ap.parse_args()
    if not args.path.exists():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 2
    return {"inspect": inspect, "verify": verify, "reshard": reshard}[args.command](args.path)


if __name__ == "__main__":
    sys.exit(main())
