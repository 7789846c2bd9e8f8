"""`ShardLoader`: exact, resumable batches from a prepared dataset, independent of the layout.

The global batch at optimizer step s is a pure function of (dataset, seed, global batch size,
shuffle_buffer); the data-parallel size only decides who reads which part of it:

1. the train shards are permuted with a generator seeded by (seed, epoch) and their samples
   concatenated; the validation split keeps manifest order;
2. the sequence is cut to `steps_per_epoch * global_batch` samples (`steps_per_epoch = samples //
   global_batch`); the cut-off tail (< global_batch samples) changes every epoch because the shard
   order does, and is reported as `dropped_per_epoch`;
3. train only: the sequence is shuffled inside windows of `shuffle_buffer` samples, each window
   with a generator seeded by (seed, epoch, window). Like a shuffle buffer, but it depends only on
   positions: resuming needs just (epoch, step);
4. global batch s is positions [s*G, (s+1)*G). Its sample ids are sorted and dp rank r takes the
   r-th contiguous slice of G / dp_size ids, as `G / (dp_size * batch_size)` micro-batches of
   `batch_size`. Sorting keeps reads local: a rank reads only the shards holding its slice (about
   1/dp_size of the shards of a window). The loss of a step is the mean over the whole global
   batch, so the order inside it does not matter.
5. with DataLoader workers, worker w builds this rank's micro-batches k = w, w+W, ... and the
   DataLoader returns them in order, so the stream is the same for every `num_workers`.

So runs on any number of ranks see the same global batches; every sample is seen at most once per
epoch and exactly once when the split divides evenly. `state_dict()` is (epoch, step) in global
steps plus checks, the same on every rank and for every dp size: a run stopped on 2 ranks
resumes exactly on 1 or 4. Context-, tensor- and pipeline-parallel ranks pass their `dp_rank` and
get the same sequences.

A mixture (`weights=` with several datasets) replaces steps 1-3 by `_MixLayout`: each position
of the epoch draws its source so that the epoch holds each source in proportion to its weight,
and takes that source's next sample; steps 4-5 are the same.

Shards are read through each dataset's `Location` (a folder or a URL, `location.py`), whole and
checked against the manifest's sha256.

Corrupt or missing shards: `on_corrupt="error"` (default) raises naming the shard. With
`on_corrupt="skip"`, missing or truncated shards found at construction are left out of the layout
(all ranks see the same files, so they agree on the step count), and a shard found corrupt while
reading yields its samples as masked rows (`input_ids` = pad, `labels` = -100, which
`torch.nn.functional.cross_entropy` ignores by default) so that shapes and step counts stay equal;
both are counted (`skipped_shards`, `masked_samples`).
"""
from __future__ import annotations

import itertools
import logging
import math
import signal
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from titans_pretrain.data.manifest import Manifest, ShardInfo, load_manifest
from titans_pretrain.data.location import LocationError
from titans_pretrain.data.shards import ShardError, parse_shard
from titans_pretrain.data.workers import worker_context

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: per-rank blocks (the stream depended on dp_size)
IGNORE_INDEX = -100


def _ignore_interrupts(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the workers too (one process group); the trainer stops on it
    and saves, which needs them alive, and it ends them itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shard_problem(path: Path | None, shard: ShardInfo) -> str | None:
    """A cheap check (existence, size) of a local shard at construction; the sha256 is checked
    when read (a remote shard is only checked then: no request per shard per rank at start)."""
    if path is None:
        return None
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != shard.bytes:
        return f"has {size} bytes, manifest.json says {shard.bytes} (truncated or replaced)"
    return None


@dataclass(frozen=True)
class _Batching:
    """How a global step's samples are cut into micro-batches on each rank (both layouts)."""

    seed: int
    dp_rank: int
    dp_size: int
    batch_size: int
    global_batch: int
    steps_per_epoch: int
    shuffle: bool

    @property
    def accum(self) -> int:
        """Micro-batches per global step on each rank."""
        return self.global_batch // (self.dp_size * self.batch_size)

    def micro(self, plan: np.ndarray, k: int) -> np.ndarray:
        """Sample ids of this rank's micro-batch k of the epoch (global step k // accum)."""
        step, m = divmod(k, self.accum)
        ids = np.sort(plan[step * self.global_batch:(step + 1) * self.global_batch])
        lo = self.dp_rank * (self.global_batch // self.dp_size) + m * self.batch_size
        return ids[lo:lo + self.batch_size]


@dataclass(frozen=True)
class _Layout(_Batching):
    """What fixes the order of batches: `plan(epoch)` and `micro(plan, k)` of the module docstring."""

    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    shuffle_buffer: int

    def plan(self, epoch: int) -> np.ndarray:
        """Global sample ids of `epoch`, in order (length steps * global_batch); rank-independent."""
        n = len(self.sizes)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        offsets = np.asarray(self.offsets, dtype=np.int64)[order]
        sizes = np.asarray(self.sizes, dtype=np.int64)[order]
        plan = np.concatenate([np.arange(o, o + s, dtype=np.int64) for o, s in zip(offsets, sizes)])
        plan = plan[:self.steps_per_epoch * self.global_batch]
        if self.shuffle:
            for w, start in enumerate(range(0, len(plan), self.shuffle_buffer)):
                rng = np.random.default_rng([self.seed, epoch, w])
                window = plan[start:start + self.shuffle_buffer]
                plan[start:start + self.shuffle_buffer] = window[rng.permutation(len(window))]
        return plan


@dataclass(frozen=True)
class _MixLayout(_Batching):
    """A mixture (`data.sources`): a mix epoch of `steps_per_epoch * global_batch` positions holds
    exactly `counts[i]` samples of source i (the weights, largest remainder), in an order drawn
    by (seed, epoch); source i's j-th position is the next sample of its own endless stream
    (`sources[i].plan`, reshuffled each time it wraps). All positional: resume needs (epoch, step)."""

    sources: tuple[_Layout, ...]  # one per source, global_batch 1: every sample, every pass
    bases: tuple[int, ...]  # source i's ids start at bases[i] in the concatenated shard list
    counts: tuple[int, ...]

    def labels(self, epoch: int) -> np.ndarray:
        """The source of each position of mix epoch `epoch`."""
        labels = np.repeat(np.arange(len(self.counts)), self.counts)
        return labels[np.random.default_rng([self.seed, epoch, 0x6D6978]).permutation(len(labels))]

    def plan(self, epoch: int) -> np.ndarray:
        labels = self.labels(epoch)
        out = np.empty(len(labels), dtype=np.int64)
        for i, (source, base, n) in enumerate(zip(self.sources, self.bases, self.counts)):
            where = np.nonzero(labels == i)[0]
            k = epoch * n + np.arange(n, dtype=np.int64)  # positions in source i's own stream
            size = source.steps_per_epoch
            for q in np.unique(k // size):
                sel = (k // size) == q
                out[where[sel]] = base + source.plan(int(q))[k[sel] % size]
        return out

    def step_counts(self, labels: np.ndarray, step: int) -> np.ndarray:
        """Samples of each source in global step `step` of the epoch whose labels are given."""
        part = labels[step * self.global_batch:(step + 1) * self.global_batch]
        return np.bincount(part, minlength=len(self.counts))


class _BatchStream(IterableDataset):
    """This rank's micro-batches from index `start` on (counted over epochs; forever for train, to
    the end of epoch 0 for validation); DataLoader worker w of W builds start + w, start + w + W, ...
    """

    def __init__(self, layout, shards: list[tuple[ShardInfo, object]], *, start: int,
                 sample_len: int, dtype: str, pad_id: int, skip_corrupt: bool, cache_shards: int):
        self.layout, self.shards, self.start = layout, shards, start
        self.sample_len, self.dtype, self.pad_id = sample_len, np.dtype(dtype), pad_id
        self.skip_corrupt, self.cache_shards = skip_corrupt, cache_shards
        self.offsets = np.asarray([0] + list(itertools.accumulate(s.samples for s, _ in shards))[:-1],
                                  dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        per_epoch = self.layout.steps_per_epoch * self.layout.accum
        end = None if self.layout.shuffle else per_epoch
        cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        plan_epoch, plan = -1, None
        for g in itertools.count(self.start + worker, workers):
            if end is not None and g >= end:
                return
            epoch, k = divmod(g, per_epoch)
            if epoch != plan_epoch:
                plan_epoch, plan = epoch, self.layout.plan(epoch)
            yield self._batch(self.layout.micro(plan, k), cache)

    def _shard(self, index: int, cache: OrderedDict) -> np.ndarray | None:
        if index in cache:
            cache.move_to_end(index)
            return cache[index]
        shard, location = self.shards[index]
        try:
            try:
                raw = location.read(shard.file, shard.sha256)
            except LocationError as exc:
                raise ShardError(f"shard {exc}; re-run `prepare` or set data.on_corrupt=skip to go "
                                 "on without it") from exc
            data = parse_shard(raw, location.url(shard.file), sample_len=self.sample_len,
                               dtype=self.dtype, expected_samples=shard.samples,
                               expected_sha256=shard.sha256)
        except ShardError as exc:
            if not self.skip_corrupt:
                raise
            log.warning("%s; its %d samples are masked (on_corrupt='skip')", exc, shard.samples)
            data = None
        cache[index] = data
        while len(cache) > self.cache_shards:
            cache.popitem(last=False)
        return data

    def _batch(self, ids: np.ndarray, cache: OrderedDict) -> dict[str, torch.Tensor]:
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        rows = np.empty((len(ids), self.sample_len), dtype=np.int64)
        masked = np.zeros(len(ids), dtype=bool)
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            data = self._shard(int(shard), cache)
            if data is None:
                masked[where] = True
            else:
                rows[where] = data[ids[where] - self.offsets[shard]]
        tokens = torch.from_numpy(rows)
        input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        if masked.any():
            m = torch.from_numpy(masked)
            input_ids[m] = self.pad_id
            labels[m] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}


class ShardLoader:
    """Micro-batches `{"input_ids", "labels"}` of shape `[batch_size, seq_len]` for one dp rank.

    `global_batch` (samples per optimizer step over all ranks, default `batch_size * dp_size`)
    fixes the stream; each rank yields `global_batch / (dp_size * batch_size)` micro-batches per
    step. `split="train"` iterates forever over epochs (reshuffled per epoch); `split="val"` is one
    ordered pass per `iter()`. See the module docstring for the layout and the guarantees.
    """

    def __init__(self, manifest, *, split: str = "train", batch_size: int, dp_rank: int,
                 dp_size: int, global_batch: int | None = None, seed: int = 0, num_workers: int = 0,
                 shuffle_buffer: int = 4096, on_corrupt: str = "error",
                 weights: list[float] | None = None):
        """`manifest`: a `Manifest`, folder or URL; with `weights`, a list of them (a mixture)."""
        sources = list(manifest) if weights is not None else [manifest]
        sources = [m if isinstance(m, Manifest) else load_manifest(m) for m in sources]
        self.manifest = sources[0]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        global_batch = batch_size * dp_size if global_batch is None else global_batch
        if global_batch < 1 or global_batch % (batch_size * dp_size):
            raise ValueError(f"global_batch={global_batch} must be a positive multiple of batch_size "
                             f"({batch_size}) x dp_size ({dp_size})")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if weights is not None:
            _check_mixture(sources, weights)
        self.split, self.batch_size, self.global_batch = split, batch_size, global_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers, self.shuffle_buffer, self.on_corrupt = num_workers, shuffle_buffer, on_corrupt
        self.shuffle = split == "train"
        self.accum = global_batch // (batch_size * dp_size)
        self.weights = None if weights is None else [float(w) for w in weights]
        self._sources = sources

        self.skipped_shards: list[str] = []
        self._shards: list[tuple[ShardInfo, object]] = []
        per_source: list[list[int]] = []
        for source in sources:
            sizes = []
            for shard in source.shards(split):
                problem = _shard_problem(source.location.path(shard.file), shard)
                if problem is None:
                    self._shards.append((shard, source.location))
                    sizes.append(shard.samples)
                elif on_corrupt == "skip":
                    log.warning("shard %s %s; left out (on_corrupt='skip')", shard.file, problem)
                    self.skipped_shards.append(shard.file)
                else:
                    raise ShardError(f"shard {source.location.url(shard.file)} {problem}; re-run "
                                     f"`prepare`, or set data.on_corrupt=skip to leave it out")
            per_source.append(sizes)
        sizes = [n for source in per_source for n in source]
        self.samples = sum(sizes)
        self.steps_per_epoch = self.samples // global_batch  # a mixture's: one pass's worth of steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"split {split!r} of {self.manifest.path} has {self.samples} usable "
                             f"samples, fewer than one global batch ({global_batch}; at least "
                             f"dp_size * batch_size = {batch_size * dp_size}): lower the batch size "
                             f"or prepare more data (or a larger val_fraction)")
        common = dict(seed=seed, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size,
                      global_batch=global_batch, steps_per_epoch=self.steps_per_epoch,
                      shuffle=self.shuffle)
        if weights is None:
            offsets = [0] + list(itertools.accumulate(sizes))[:-1]
            self.dropped_per_epoch = self.samples - self.steps_per_epoch * global_batch
            self._layout = _Layout(sizes=tuple(sizes), offsets=tuple(offsets),
                                   shuffle_buffer=shuffle_buffer, **common)
        else:
            layouts, bases, base = [], [], 0
            for i, (source, sizes_i) in enumerate(zip(sources, per_source)):
                if not sizes_i:
                    raise ValueError(f"data.sources[{i}] ({source.path}) has no usable {split!r} "
                                     "samples; prepare it with that split or leave it out")
                n = sum(sizes_i)
                layouts.append(_Layout(sizes=tuple(sizes_i),
                                       offsets=tuple([0] + list(itertools.accumulate(sizes_i))[:-1]),
                                       seed=seed + 7919 * (i + 1), dp_rank=0, dp_size=1,
                                       batch_size=1, global_batch=1, steps_per_epoch=n,
                                       shuffle=self.shuffle, shuffle_buffer=shuffle_buffer))
                bases.append(base)
                base += n
            self.dropped_per_epoch = 0  # sources wrap around on their own; nothing is cut
            self._layout = _MixLayout(sources=tuple(layouts), bases=tuple(bases),
                                      counts=_allocate(self.steps_per_epoch * global_batch, weights),
                                      **common)
        self.source_samples = [0] * len(sources)  # samples of each source in completed steps
        self._labels: tuple[int, np.ndarray] | None = None
        # Enough decoded shards per worker to cover two shuffle windows (a global batch can
        # straddle a window boundary) without re-reading.
        self._cache_shards = (2 * math.ceil(shuffle_buffer / max(1, min(s for s in sizes if s > 0)))
                              + 2) * len(sources)
        self.epoch = 0
        self.step = 0  # global steps of the current epoch completed
        self.micro = 0  # this rank's micro-batches of the current step already handed out
        self.masked_samples = 0

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current (epoch, step, micro) on; the position advances as batches
        are taken.

        DataLoader workers are started once per `iter()` (not per epoch) from a forkserver: forking
        the training process itself deadlocked workers after gloo collectives in our tests.
        """
        start = (self.epoch * self.steps_per_epoch + self.step) * self.accum + self.micro
        dataset = _BatchStream(self._layout, self._shards, start=start,
                               sample_len=self.manifest.sample_len, dtype=self.manifest.dtype,
                               pad_id=max(self.manifest.pad_id, 0),
                               skip_corrupt=self.on_corrupt == "skip",
                               cache_shards=self._cache_shards)
        left = (self.steps_per_epoch - self.step) * self.accum - self.micro
        workers = self.num_workers if self.shuffle else min(self.num_workers, left)
        if workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                      multiprocessing_context=worker_context(),
                                      worker_init_fn=_ignore_interrupts))
        for batch in batches:
            if self.on_corrupt == "skip":
                self.masked_samples += int((batch["labels"] == IGNORE_INDEX).all(dim=1).sum())
            self.micro += 1
            if self.micro == self.accum:
                self._count_sources()
                self.step, self.micro = self.step + 1, 0
                if self.step == self.steps_per_epoch and self.shuffle:
                    self.epoch, self.step = self.epoch + 1, 0
            yield batch
        if not self.shuffle:
            self.epoch, self.step, self.micro = 0, 0, 0  # the next iter() is a fresh validation pass

    def _count_sources(self) -> None:
        """Add the global batch of (epoch, step) to `source_samples` (all ranks agree)."""
        if self.weights is None:
            self.source_samples[0] += self.global_batch
            return
        if self._labels is None or self._labels[0] != self.epoch:
            self._labels = (self.epoch, self._layout.labels(self.epoch))
        counts = self._layout.step_counts(self._labels[1], self.step)
        self.source_samples = [a + int(b) for a, b in zip(self.source_samples, counts)]

    # -- checkpointing ------------------------------------------------------------------------

    def _layout_id(self) -> str:
        prints = "+".join(m.fingerprint() for m in self._sources)
        return f"{prints}:{','.join(self.skipped_shards)}"

    def state_dict(self) -> dict:
        """Where the stream stands: (epoch, step) in global steps and what must match to resume it.

        Identical on every rank and independent of dp_size at a step boundary (micro == 0), so
        saving one rank's state is enough and any number of ranks resumes it.
        """
        return {"version": STATE_VERSION, "split": self.split, "epoch": self.epoch,
                "step": self.step, "micro": self.micro, "seed": self.seed,
                "global_batch": self.global_batch, "batch_size": self.batch_size,
                "dp_size": self.dp_size, "shuffle_buffer": self.shuffle_buffer,
                "weights": self.weights, "source_samples": list(self.source_samples),
                "layout": self._layout_id()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if state.get("version") == 1:
            state = self._from_version_1(state)
        elif state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}; it was saved by another version of this code")
        state.setdefault("weights", None)
        if state["weights"] != self.weights:
            raise ValueError(f"loader state has mixture weights {state['weights']} but this loader "
                             f"has {self.weights}; resume with the same data.sources")
        if state["layout"] != self._layout_id():
            raise ValueError("the dataset changed since this loader state was saved (manifest "
                             "shards or skipped shards differ); resume with the same dataset, or "
                             "start the data stream afresh")
        for key in ("split", "seed", "global_batch", "shuffle_buffer"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}; resume with the same setting")
        if state["micro"] and (state["dp_size"], state["batch_size"]) != (self.dp_size, self.batch_size):
            raise ValueError(f"loader state stands inside global step {state['step']} (micro-batch "
                             f"{state['micro']} of dp_size={state['dp_size']}, batch_size="
                             f"{state['batch_size']}); only a step boundary resumes on another "
                             f"layout: resume with the same dp_size and batch_size")
        if state["step"] > self.steps_per_epoch:
            raise ValueError(f"loader state step {state['step']} exceeds steps_per_epoch "
                             f"{self.steps_per_epoch}")
        self.epoch, self.step, self.micro = int(state["epoch"]), int(state["step"]), int(state["micro"])
        self.source_samples = list(state.get("source_samples") or [0] * len(self._sources))
        if self.step == self.steps_per_epoch and self.shuffle:
            self.epoch, self.step = self.epoch + 1, 0

    def _from_version_1(self, state: dict) -> dict:
        """A version-1 state (per-rank blocks, written before the stream became layout-independent)
        resumes at an epoch boundary only: the next epoch is laid out the new way."""
        old_steps = self.samples // (state["batch_size"] * state["dp_size"])
        if state["step"] not in (0, old_steps):
            raise ValueError(f"the loader state was written by an older version whose data stream "
                             f"depended on the data-parallel size, and it stands mid-epoch (epoch "
                             f"{state['epoch']}, step {state['step']} of {old_steps}); it resumes "
                             f"only at an epoch boundary: resume from a checkpoint at an epoch "
                             f"boundary, or start the data stream afresh (a new run_dir)")
        epoch = state["epoch"] + (1 if state["step"] else 0)
        return dict(state, epoch=epoch, step=0, micro=0, global_batch=self.global_batch,
                    weights=None, source_samples=None)


def _allocate(total: int, weights: list[float]) -> tuple[int, ...]:
    """`total` split in proportion to `weights` (largest remainder, ties to the first)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[:total - int(counts.sum())]:
        counts[i] += 1
    return tuple(int(c) for c in counts)


def _check_mixture(sources: list[Manifest], weights: list[float]) -> None:
    """Sources must be interchangeable token streams: same tokenizer, sequence length and dtype."""
    if len(weights) != len(sources) or not sources:
        raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
    for i, w in enumerate(weights):
        if not (isinstance(w, (int, float)) and w > 0 and math.isfinite(w)):
            raise ValueError(f"data.sources[{i}].weight must be a positive number, got {w!r}")
    first = sources[0]
    for i, m in enumerate(sources[1:], 1):
        for what in ("tokenizer_sha256", "seq_len", "dtype"):
            if getattr(m, what) != getattr(first, what):
                raise ValueError(f"data.sources[{i}] ({m.path}) has another {what} than "
                                 f"data.sources[0] ({first.path}): {getattr(m, what)!r} vs "
                                 f"{getattr(first, what)!r}; prepare every source with the same "
                                 f"tokenizer (--tokenizer) and --seq-len")
