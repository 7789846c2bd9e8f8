"""Webdataset shards: deterministic writing and whole-shard reading.

A shard is a plain tar file, one member per sample named `{key}.tokens.npy` (webdataset groups
members by key, so `webdataset.WebDataset(url).decode()` reads them as `{"tokens.npy": array}`).
Each member is a 1-D `.npy` array of `seq_len + 1` token ids (uint16 when the vocab fits, else
uint32). Tar headers carry fixed metadata (mtime 0, uid 0, ...) so the same samples give
byte-identical shards; a shard is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MEMBER_SUFFIX = ".tokens.npy"


class ShardError(RuntimeError):
    """A shard that is missing, truncated or corrupt; the message names it."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass
class WrittenShard:
    file: str
    samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Writes one tar shard atomically: `add()` samples, then `close()` renames it into place."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp = path.with_name(path.name + ".partial")
        self._digest = hashlib.sha256()
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=_HashingWriter(self._file, self._digest), mode="w",
                                 format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, key: str, tokens: np.ndarray) -> None:
        data = _npy_bytes(tokens)
        info = tarfile.TarInfo(name=key + MEMBER_SUFFIX)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> WrittenShard:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return WrittenShard(file=self.path.name, samples=self.samples,
                            bytes=self.path.stat().st_size, sha256=self._digest.hexdigest())


class _HashingWriter:
    """A write-only file object that hashes what passes through (avoids re-reading the shard)."""

    def __init__(self, file, digest):
        self._file, self._digest = file, digest

    def write(self, data) -> int:
        self._digest.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()


def read_shard(path: Path, *, sample_len: int, dtype: np.dtype, expected_samples: int,
               expected_sha256: str | None = None) -> np.ndarray:
    """Read a whole local shard into a `[samples, sample_len]` array, checking it against the manifest.

    Raises `ShardError` naming the shard when it is missing, its checksum differs, it cannot be
    parsed, or its samples do not have the recorded count and length.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ShardError(f"shard {path} cannot be read ({exc.strerror or exc}); re-run `prepare` "
                         f"or set data.on_corrupt=skip to go on without it") from exc
    return parse_shard(data, str(path), sample_len=sample_len, dtype=dtype,
                       expected_samples=expected_samples, expected_sha256=expected_sha256)


def parse_shard(data: bytes, name: str, *, sample_len: int, dtype: np.dtype, expected_samples: int,
                expected_sha256: str | None = None) -> np.ndarray:
    """The samples of a shard's bytes (read from anywhere: `name` is its path or URL), checked."""
    path = name
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ShardError(f"shard {path} is corrupt: its sha256 differs from manifest.json; "
                         f"re-run `prepare` or set data.on_corrupt=skip to go on without it")
    out = np.empty((expected_samples, sample_len), dtype=dtype)
    count = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.name.endswith(MEMBER_SUFFIX):
                    continue
                array = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                if count >= expected_samples or array.shape != (sample_len,):
                    raise ShardError(f"shard {path} does not match manifest.json (sample "
                                     f"{member.name}: shape {array.shape}, index {count}); "
                                     f"re-run `prepare`")
                out[count] = array
                count += 1
    except (tarfile.TarError, ValueError, OSError, EOFError) as exc:
        raise ShardError(f"shard {path} is corrupt ({type(exc).__name__}: {exc}); re-run "
                         f"`prepare` or set data.on_corrupt=skip to go on without it") from exc
    if count != expected_samples:
        raise ShardError(f"shard {path} holds {count} samples, manifest.json says "
                         f"{expected_samples}; re-run `prepare`")
    return out
