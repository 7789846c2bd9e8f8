"""`prepare`: text corpus -> sentencepiece tokenizer + packed webdataset shards + manifest.json.

Pipeline (one pass over the corpus after the tokenizer exists):

    files (sorted) -> documents -> split by a seeded hash of the document index (train/val)
      -> tokenized in `workers` processes (order kept) -> packed per split into samples of
      seq_len + 1 tokens, EOS after every document -> tar shards of `shard_samples` samples

Guarantees: no token is lost except the final remainder of each split (shorter than a sample,
counted as `dropped_tokens`); the same inputs and parameters give byte-identical shards whatever
`workers` is; the dataset is built in a temporary sibling folder that is renamed into place after
`manifest.json` is written, so a crashed run never leaves output that looks complete, and an
existing dataset is never partially overwritten. An existing complete output with the same cache
key (inputs fingerprint + parameters) is reused instead of rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from titans_pretrain.data import default_corpus
from titans_pretrain.data.manifest import (FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardInfo,
                                           SplitInfo, Totals, load_manifest, save_manifest)
from titans_pretrain.data.shards import ShardWriter, sha256_file, token_dtype
from titans_pretrain.data.sources import InputError, ReadOptions, ReadTotals, iter_corpus, resolve_inputs
from titans_pretrain.data.tokenizer import Tokenizer, train_tokenizer
from titans_pretrain.data.workers import worker_context

log = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.model"
SPLITS = ("train", "val")
_BATCH_CHARS = 1 << 18  # documents go to the tokenizer processes in ~256 KB batches


@dataclass(frozen=True)
class PrepareParams:
    """Everything that determines the output bytes (and so the cache key)."""

    vocab_size: int
    seq_len: int
    val_fraction: float
    seed: int
    text_field: str
    shard_samples: int
    tokenizer_sample_bytes: int
    default_corpus_bytes: int

    def validate(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_samples < 1:
            raise ValueError(f"shard_samples must be >= 1, got {self.shard_samples}")


def _unit_hash(seed: int, index: int) -> float:
    """A seeded, order-independent uniform number in [0, 1) for item `index`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


# Sample keys `{index:09d}_d{document:09d}_t{token:07d}`: sample `index` of its split starts at
# token `token` of the corpus's `document`-th non-empty document (files in sorted path order;
# `provenance.trace` maps it to the file). Part of the cache key: older datasets are rebuilt.
KEY_FORMAT = "index_document_token"


def sample_key(index: int, document: int, token: int) -> str:
    return f"{index:09d}_d{document:09d}_t{token:07d}"


def _fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _cache_key(files: list[Path], params: PrepareParams, tokenizer_sha: str | None) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "keys": KEY_FORMAT, "files": _fingerprint(files),
                       "params": asdict(params), "tokenizer": tokenizer_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- tokenization in worker processes --------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(model_file: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = Tokenizer(model_file)
    _worker_dtype = token_dtype(_worker_tokenizer.vocab_size)


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None and _worker_dtype is not None
    return [np.asarray(ids, dtype=_worker_dtype) for ids in _worker_tokenizer.encode_batch(texts)]


def _batches(documents: Iterator[str], seed: int, val_fraction: float
             ) -> Iterator[tuple[list[str], list[str]]]:
    """Group documents into ~256 KB batches, each with the split of every document."""
    splits: list[str] = []
    texts: list[str] = []
    size = 0
    for index, text in enumerate(documents):
        splits.append("val" if _unit_hash(seed, index) < val_fraction else "train")
        texts.append(text)
        size += len(text)
        if size >= _BATCH_CHARS:
            yield splits, texts
            splits, texts, size = [], [], 0
    if texts:
        yield splits, texts


def _encoded(batches: Iterator[tuple[list[str], list[str]]], model_file: Path, workers: int
             ) -> Iterator[tuple[list[str], list[np.ndarray], int]]:
    """Tokenize batches, in order, with a bounded number in flight (memory stays flat)."""
    if workers <= 1:
        _init_worker(str(model_file))
        for splits, texts in batches:
            yield splits, _encode_batch(texts), sum(len(t) for t in texts)
        return
    context = worker_context(fork_without_torch=True)
    with context.Pool(workers, initializer=_init_worker, initargs=(str(model_file),)) as pool:
        pending: deque = deque()
        for splits, texts in batches:
            pending.append((splits, pool.apply_async(_encode_batch, (texts,)),
                            sum(len(t) for t in texts)))
            if len(pending) >= 2 * workers:
                s, result, chars = pending.popleft()
                yield s, result.get(), chars
        while pending:
            s, result, chars = pending.popleft()
            yield s, result.get(), chars


# --- packing and shard writing ------------------------------------------------------------------

class _SplitWriter:
    """Packs one split's documents into samples of `sample_len` tokens and writes its shards."""

    def __init__(self, folder: Path, split: str, sample_len: int, eos_id: int, dtype: np.dtype,
                 shard_samples: int):
        self.folder, self.split, self.sample_len = folder, split, sample_len
        self.eos = np.asarray([eos_id], dtype=dtype)
        self.shard_samples = shard_samples
        self.pending = np.empty(0, dtype=dtype)
        self.pending_start = (0, 0)  # (document, token) where `pending` starts
        self.shards: list[ShardInfo] = []
        self.samples = 0
        self._writer: ShardWriter | None = None

    def add_document(self, ids: np.ndarray, document: int) -> None:
        """Append document number `document` (over the whole corpus) and its EOS."""
        held = len(self.pending)
        start = self.pending_start if held else (document, 0)

        def origin(position: int) -> tuple[int, int]:
            if position < held:
                return start[0], start[1] + position
            return document, position - held

        tokens = np.concatenate([self.pending, ids, self.eos])
        full = len(tokens) // self.sample_len
        for r, row in enumerate(tokens[: full * self.sample_len].reshape(full, self.sample_len)):
            self._write(row, *origin(r * self.sample_len))
        self.pending = tokens[full * self.sample_len:]
        self.pending_start = origin(full * self.sample_len)

    def _write(self, row: np.ndarray, document: int, token: int) -> None:
        if self._writer is None:
            name = f"{self.split}-{len(self.shards):05d}.tar"
            self._writer = ShardWriter(self.folder / name)
        self._writer.add(sample_key(self.samples, document, token), row)
        self.samples += 1
        if self._writer.samples == self.shard_samples:
            self._close_shard()

    def _close_shard(self) -> None:
        written = self._writer.close()
        self.shards.append(ShardInfo(file=written.file, samples=written.samples,
                                     bytes=written.bytes, sha256=written.sha256))
        self._writer = None

    def finish(self) -> int:
        """Close the last shard; return the dropped remainder (tokens shorter than a sample)."""
        if self._writer is not None:
            self._close_shard()
        return int(len(self.pending))


# --- the tokenizer sample -----------------------------------------------------------------------

def _tokenizer_sample(files: list[Path], options: ReadOptions, sample_bytes: int, seed: int
                      ) -> list[str]:
    """A deterministic, bounded sample of documents spread over the corpus."""
    total = sum(p.stat().st_size for p in files)
    keep = min(1.0, sample_bytes / max(total, 1))
    sample, size = [], 0
    for index, text in enumerate(iter_corpus(files, options, ReadTotals())):
        if keep < 1.0 and _unit_hash(seed + 1, index) >= keep:
            continue
        sample.append(text)
        size += len(text)
        if size >= sample_bytes:
            break
    return sample


# --- the entry point ----------------------------------------------------------------------------

def prepare_dataset(inputs: list[str] | None, output: str | os.PathLike, *,
                    tokenizer: str | None = None, vocab_size: int = 8192, seq_len: int = 512,
                    workers: int = 1, val_fraction: float = 0.02, seed: int = 0,
                    text_field: str = "text", shard_samples: int = 1024,
                    tokenizer_sample_bytes: int = 4 << 20,
                    default_corpus_bytes: int = default_corpus.DEFAULT_MAX_BYTES,
                    overwrite: bool = False, progress: bool | None = None) -> Path:
    """Build (or reuse) a dataset in `output` and return the path of its `manifest.json`.

    `inputs=None` uses the embedded default corpus (the standard library sources). With
    `tokenizer` given, that sentencepiece model is used (and copied into the dataset) and
    `vocab_size` is ignored; otherwise a lossless BPE model of `vocab_size` pieces is trained on
    a sample of about `tokenizer_sample_bytes` of the corpus. Validation takes whole documents
    (about `val_fraction` of them), so no document straddles the two splits.
    """
    started = time.perf_counter()
    output = Path(output).resolve()
    params = PrepareParams(vocab_size=vocab_size, seq_len=seq_len, val_fraction=val_fraction,
                           seed=seed, text_field=text_field, shard_samples=shard_samples,
                           tokenizer_sample_bytes=tokenizer_sample_bytes,
                           default_corpus_bytes=default_corpus_bytes if inputs is None else 0)
    params.validate()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    files = (default_corpus.default_corpus_files(default_corpus_bytes) if inputs is None
             else resolve_inputs(list(inputs)))
    tokenizer_sha = sha256_file(tokenizer) if tokenizer else None
    if tokenizer_sha:  # a given tokenizer fixes the vocab; the requested size plays no role
        params = PrepareParams(**{**asdict(params), "vocab_size": 0})
    key = _cache_key(files, params, tokenizer_sha)

    reused = _existing(output, key, overwrite)
    if reused is not None:
        log.info("reusing the complete dataset in %s (same inputs and parameters)", output)
        return reused

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _build(files, tmp, params, key, tokenizer, workers, progress,
                          source_label="default" if inputs is None else "inputs")
        save_manifest(manifest, tmp)  # last: its presence marks the dataset complete
        final = _publish(tmp, output, key, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s in %.1f s", output, time.perf_counter() - started)
    return final


def _existing(output: Path, key: str, overwrite: bool) -> Path | None:
    """The manifest of a reusable dataset at `output`, None to build, or an error."""
    manifest_path = output / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            if load_manifest(manifest_path).cache_key == key:
                return manifest_path
        except (ValueError, KeyError, TypeError):
            pass
        if not overwrite:
            raise FileExistsError(f"{output} already holds a dataset built from other inputs or "
                                  f"parameters; pass --overwrite (overwrite=True) to replace it, "
                                  f"or choose another --output")
    elif output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FileExistsError(f"{output} exists and is not a dataset (no {MANIFEST_NAME}); "
                              f"pass --overwrite to replace it, or choose another --output")
    return None


def _publish(tmp: Path, output: Path, key: str, overwrite: bool) -> Path:
    """Move the finished dataset into place; the old one (if any) goes only after it is there."""
    old = None
    if output.exists():
        if output.is_dir() and not any(output.iterdir()):
            output.rmdir()
        else:
            old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output, old)
    try:
        os.replace(tmp, output)
    except OSError:
        # Another process (e.g. a second rank) published first: fine if it built the same thing.
        manifest_path = output / MANIFEST_NAME
        if manifest_path.is_file() and load_manifest(manifest_path).cache_key == key:
            shutil.rmtree(tmp, ignore_errors=True)
            return manifest_path
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return output / MANIFEST_NAME


def _build(files: list[Path], folder: Path, params: PrepareParams, key: str,
           tokenizer: str | None, workers: int, progress: bool | None, source_label: str
           ) -> Manifest:
    from tqdm import tqdm

    options = ReadOptions(text_field=params.text_field)
    model_file = folder / TOKENIZER_NAME
    if tokenizer:
        shutil.copyfile(tokenizer, model_file)
        trained = False
    else:
        sample = _tokenizer_sample(files, options, params.tokenizer_sample_bytes, params.seed)
        if not sample:
            raise InputError(f"the inputs hold no non-empty documents ({len(files)} files); "
                             f"nothing to prepare")
        train_tokenizer(sample, model_file, vocab_size=params.vocab_size)
        del sample
        trained = True
    tok = Tokenizer(model_file)
    if tok.eos_id < 0:
        raise ValueError(f"tokenizer {tokenizer} has no EOS piece; packing needs one between "
                         f"documents: train it with an eos_id or let `prepare` train one")
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(folder, s, params.seq_len + 1, tok.eos_id, dtype,
                               params.shard_samples) for s in SPLITS}

    totals = ReadTotals()
    tokens = document = 0
    documents = iter_corpus(files, options, totals)
    total_bytes = sum(p.stat().st_size for p in files)
    # progress=None: a bar only on a terminal (tqdm's rule); True/False force it on/off.
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare",
               disable=None if progress is None else not progress, mininterval=0.5)
    with bar:
        for splits, encoded, chars in _encoded(_batches(documents, params.seed, params.val_fraction),
                                               model_file, workers):
            for split, ids in zip(splits, encoded):
                writers[split].add_document(ids, document)
                document += 1
                tokens += len(ids) + 1
            bar.update(chars)
            bar.set_postfix(docs=totals.documents, tokens=tokens, refresh=False)
    dropped = sum(w.finish() for w in writers.values())

    if totals.documents == 0:
        raise InputError(f"the inputs hold no non-empty documents ({len(files)} files, "
                         f"{totals.empty_documents} empty); nothing to prepare")
    if writers["train"].samples == 0:
        raise InputError(f"the corpus is too small: {tokens} tokens do not fill one training "
                         f"sample of seq_len + 1 = {params.seq_len + 1} tokens; use a smaller "
                         f"--seq-len or more text")
    if params.val_fraction > 0 and writers["val"].samples == 0:
        log.warning("the validation split is empty (%d documents, val_fraction=%s): raise "
                    "--val-fraction or add text if training needs validation",
                    totals.documents, params.val_fraction)
    return Manifest(
        format_version=FORMAT_VERSION, tokenizer_file=TOKENIZER_NAME,
        tokenizer_sha256=sha256_file(model_file), vocab_size=tok.vocab_size, bos_id=tok.bos_id,
        eos_id=tok.eos_id, pad_id=tok.pad_id, seq_len=params.seq_len, dtype=dtype.name,
        splits={s: SplitInfo(shards=w.shards) for s, w in writers.items()},
        totals=Totals(files=len(files), documents=totals.documents,
                      empty_documents=totals.empty_documents, bytes=totals.bytes,
                      replaced_bytes=totals.replaced_bytes, tokens=tokens, dropped_tokens=dropped,
                      sources=[{"path": s.path, "documents": s.documents, "bytes": s.bytes,
                                "replaced_bytes": s.replaced_bytes} for s in totals.sources]),
        params={**asdict(params), "source": source_label, "tokenizer_trained": trained},
        cache_key=key, root=folder,
    )


def summary(manifest: Manifest, seconds: float | None = None) -> str:
    """A human-readable summary of a prepared dataset (printed by the CLI)."""
    t = manifest.totals
    lines = [f"dataset {manifest.root}",
             f"  tokenizer {manifest.tokenizer_path.name}: vocab {manifest.vocab_size} "
             f"(pad {manifest.pad_id}, bos {manifest.bos_id}, eos {manifest.eos_id})",
             f"  inputs: {t.files} files, {t.documents} documents ({t.empty_documents} empty, "
             f"skipped), {t.bytes / 1e6:.2f} MB, {t.replaced_bytes} non-UTF-8 bytes replaced",
             f"  tokens: {t.tokens} ({t.dropped_tokens} dropped as final remainders)"]
    for name, split in manifest.splits.items():
        lines.append(f"  {name}: {split.samples} samples of {manifest.sample_len} tokens in "
                     f"{len(split.shards)} shards" + ("  (empty: raise --val-fraction)"
                                                      if split.samples == 0 else ""))
    if seconds:
        lines.append(f"  time {seconds:.1f} s, {t.bytes / 1e6 / seconds:.2f} MB/s")
    return "\n".join(lines)
