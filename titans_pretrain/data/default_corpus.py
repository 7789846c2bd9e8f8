"""The embedded default corpus: the running Python's standard library sources.

Every Python installation ships them, so `prepare` (and the demo) needs no download. The sources
include a lot of English prose (docstrings, comments) and `pydoc_data/topics.py`, the text of the
language reference that `help()` shows. Tests, `site-packages` and generated caches are excluded.
The selection is deterministic for a given Python version: sorted paths, then an even stride over
them when the total exceeds `max_bytes`.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

DEFAULT_MAX_BYTES = 8 * 1024 * 1024

_EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                   "lib2to3", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def default_corpus_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """Sorted stdlib `.py` files, evenly thinned to about `max_bytes` in total."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and not _EXCLUDED_PARTS.intersection(p.relative_to(root).parts))
    if not files:
        raise RuntimeError(f"no Python sources found under {root}; this Python installation has no "
                           f"standard library sources, so pass --input with your own text")
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    if total <= max_bytes:
        return files
    # Keep every k-th file (k fractional) so that the sample spans the whole library.
    keep = max_bytes / total
    chosen, credit = [], 0.0
    for path in files:
        credit += keep
        if credit >= 1.0:
            credit -= 1.0
            chosen.append(path)
    return chosen
