"""Input discovery and document reading for `prepare`.

Inputs are files, folders (searched recursively) and globs. Supported formats, each optionally
compressed with gzip (`.gz`) or zstandard (`.zst`):

- `.txt` (also `.md`, `.rst`, `.py`): one document per file;
- `.jsonl`: one JSON object per line, the document in field `text` (configurable);
- `.parquet`: one document per row, column `text` (configurable; needs `pyarrow`).

Bytes that are not UTF-8 are replaced by U+FFFD and counted (never a crash half-way through a large
corpus); empty documents are skipped and counted; a missing text field, invalid JSON or a file that
cannot be read is an error naming the file, because silently losing data is worse than stopping.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".zst")

# Counts U+FFFD replacements made while decoding; reset per file by `_decode_counting`.
_replaced = [0]


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += error.end - error.start
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("titans_count_replace", _count_and_replace)


class InputError(ValueError):
    """A problem with the inputs of `prepare`; the message names the file and the fix."""


@dataclass
class SourceStats:
    """What was read from one input file (recorded in the manifest)."""

    path: str
    documents: int = 0
    empty_documents: int = 0
    bytes: int = 0
    replaced_bytes: int = 0


@dataclass
class ReadOptions:
    text_field: str = "text"


def _format_of(path: Path) -> tuple[str, str | None] | None:
    """(format, compression) from the file name, or None when the file is not an input."""
    name = path.name.lower()
    compression = None
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            compression, name = suffix, name[: -len(suffix)]
            break
    if name.endswith(TEXT_SUFFIXES):
        return "text", compression
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(PARQUET_SUFFIXES) and compression is None:
        return "parquet", None
    return None


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, folders and globs into a sorted, de-duplicated list of input files.

    Sorted so that the same inputs always give the same document order (determinism).
    """
    if not inputs:
        raise InputError("no inputs given; pass --input with files, folders or globs "
                         "(or omit it to use the embedded default corpus)")
    files: set[Path] = set()
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and _format_of(p) is not None]
            if not found:
                raise InputError(f"folder {spec} holds no supported input files "
                                 f"(.txt/.jsonl/.parquet, optionally .gz/.zst)")
            files.update(p.resolve() for p in found)
        elif path.is_file():
            if _format_of(path) is None:
                raise InputError(f"{spec}: unsupported file type; use .txt, .jsonl or .parquet "
                                 f"(optionally compressed as .gz or .zst)")
            files.add(path.resolve())
        elif glob.has_magic(spec):
            found = [Path(p) for p in glob.glob(spec, recursive=True)]
            matched = [p for p in found if p.is_file() and _format_of(p) is not None]
            for p in found:
                if p.is_dir():
                    matched += [q for q in p.rglob("*") if q.is_file() and _format_of(q) is not None]
            if not matched:
                raise InputError(f"glob {spec!r} matches no supported input files")
            files.update(p.resolve() for p in matched)
        else:
            raise InputError(f"input {spec} does not exist")
    return sorted(files)


def _open_binary(path: Path, compression: str | None):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError as exc:
            raise InputError(f"{path}: reading .zst needs the `zstandard` package; "
                             f"pip install 'titans-pretrain[data]'") from exc
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _read_all(path: Path, compression: str | None) -> bytes:
    try:
        with _open_binary(path, compression) as f:
            return f.read()
    except InputError:
        raise
    except Exception as exc:  # permission, corrupt gzip/zstd stream, I/O errors
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}; fix or remove the "
                         f"file from the inputs") from exc


def _decode(data: bytes, stats: SourceStats) -> str:
    _replaced[0] = 0
    text = data.decode("utf-8", errors="titans_count_replace")
    stats.replaced_bytes += _replaced[0]
    return text


def _emit(text: str, stats: SourceStats) -> Iterator[str]:
    if text:
        stats.documents += 1
        yield text
    else:
        stats.empty_documents += 1


def read_documents(path: Path, options: ReadOptions, stats: SourceStats) -> Iterator[str]:
    """Yield the non-empty documents of one input file, updating `stats`."""
    fmt = _format_of(path)
    if fmt is None:
        raise InputError(f"{path}: unsupported file type")
    kind, compression = fmt
    if kind == "parquet":
        yield from _read_parquet(path, options, stats)
        return
    data = _read_all(path, compression)
    stats.bytes += len(data)
    text = _decode(data, stats)
    if kind == "text":
        yield from _emit(text, stats)
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix the line or remove "
                             f"the file from the inputs") from exc
        if not isinstance(record, dict) or options.text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise InputError(f"{path}:{lineno}: no field {options.text_field!r} (found {keys}); "
                             f"pass --text-field NAME")
        value = record[options.text_field]
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise InputError(f"{path}:{lineno}: field {options.text_field!r} is a "
                             f"{type(value).__name__}, not a string")
        yield from _emit(value, stats)


def _read_parquet(path: Path, options: ReadOptions, stats: SourceStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"{path}: reading parquet needs `pyarrow`; "
                         f"pip install 'titans-pretrain[data]'") from exc
    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:
        raise InputError(f"cannot read parquet file {path}: {exc}; fix or remove it") from exc
    columns = handle.schema_arrow.names
    if options.text_field not in columns:
        raise InputError(f"{path}: no column {options.text_field!r} (columns: {columns}); "
                         f"pass --text-field NAME")
    stats.bytes += os.path.getsize(path)
    for batch in handle.iter_batches(columns=[options.text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield from _emit(value or "", stats)


@dataclass
class ReadTotals:
    sources: list[SourceStats] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.sources)

    @property
    def empty_documents(self) -> int:
        return sum(s.empty_documents for s in self.sources)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.sources)

    @property
    def replaced_bytes(self) -> int:
        return sum(s.replaced_bytes for s in self.sources)


def iter_corpus(files: list[Path], options: ReadOptions, totals: ReadTotals) -> Iterator[str]:
    """All documents of all files, in order; per-file stats are appended to `totals`."""
    for path in files:
        stats = SourceStats(path=str(path))
        totals.sources.append(stats)
        yield from read_documents(path, options, stats)

