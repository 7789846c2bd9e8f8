"""Inspect and verify checkpoints without training anything.

    python tools/checkpoint.py inspect RUN_DIR|CHECKPOINTS_DIR|STEP_DIR     # what it holds
    python tools/checkpoint.py verify  RUN_DIR|CHECKPOINTS_DIR|STEP_DIR     # CRC32 of every file

`inspect` prints each checkpoint's step, tokens, engine, layout, run id, the model it holds and its
size on disk; `verify` checks every checkpoint of a run (or the one named) against its manifest,
as resume does, and exits 1 if any fails. Both read only.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["inspect", "verify"])
    ap.add_argument("path", type=Path)
    args = ap.parse_args()
    if not args.path.exists():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 2
    return inspect(args.path) if args.command == "inspect" else verify(args.path)


if __name__ == "__main__":
    sys.exit(main())
