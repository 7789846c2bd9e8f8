"""`ShardLoader`: exact, resumable, data-parallel batches from a prepared dataset.

How an epoch is laid out (a pure function of seed, epoch, dp_size, batch_size, shuffle_buffer):

1. the train shards are permuted with a generator seeded by (seed, epoch) and their samples
   concatenated; the validation split keeps manifest order;
2. the sequence is cut to `steps_per_epoch * dp_size * batch_size` samples (`steps_per_epoch =
   samples // (dp_size * batch_size)`), so every rank runs the same number of steps and a
   collective never hangs at epoch end; the cut-off tail (< dp_size * batch_size samples) changes
   every epoch because the shard order does, and is reported as `dropped_per_epoch`;
3. rank r takes the r-th contiguous block (so it reads only about 1/dp_size of the shards);
4. train only: the block is shuffled inside windows of `shuffle_buffer` samples, each window with
   a generator seeded by (seed, epoch, rank, window). This plays the role of a shuffle buffer but,
   unlike a streaming buffer, depends only on positions: resuming needs just (epoch, step);
5. batch j is positions [j*B, (j+1)*B) of the block. With DataLoader workers, worker w builds the
   batches j = w, w+W, ... and the DataLoader returns them in order, so the stream is the same for
   every `num_workers`.

So: every sample is seen at most once per epoch and exactly once when the split divides evenly;
`state_dict()` is (epoch, step) plus checks, the same on every rank (any rank's state resumes every
rank); context-parallel ranks of a group pass the same `dp_rank` and get the same sequences.
Resuming with another dp_size is allowed at an epoch boundary (the next epoch is laid out for the
new size) and is an error mid-epoch.

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
from titans_pretrain.data.shards import ShardError, read_shard
from titans_pretrain.data.workers import worker_context

log = logging.getLogger(__name__)

STATE_VERSION = 1
IGNORE_INDEX = -100


def _ignore_interrupts(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the workers too (one process group); the trainer stops on it
    and saves, which needs them alive, and it ends them itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shard_problem(path: Path, shard: ShardInfo) -> str | None:
    """A cheap check (existence, size) run at construction; the sha256 is checked when read."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != shard.bytes:
        return f"has {size} bytes, manifest.json says {shard.bytes} (truncated or replaced)"
    return None


@dataclass(frozen=True)
class _Layout:
    """What fixes the order of batches: the pure function `plan(epoch)` of the module docstring."""

    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    seed: int
    dp_rank: int
    batch_size: int
    steps_per_epoch: int
    shuffle: bool
    shuffle_buffer: int

    def plan(self, epoch: int) -> np.ndarray:
        """Global sample ids of this rank's batches in `epoch`, in order (length steps * B)."""
        n = len(self.sizes)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        sizes = np.asarray(self.sizes, dtype=np.int64)[order]
        ends = np.cumsum(sizes)
        starts = ends - sizes
        block = self.steps_per_epoch * self.batch_size
        lo, hi = self.dp_rank * block, (self.dp_rank + 1) * block
        pieces = []
        for k, shard in enumerate(order):
            a, b = max(lo, int(starts[k])), min(hi, int(ends[k]))
            if a < b:
                base = self.offsets[shard] - int(starts[k])
                pieces.append(np.arange(a + base, b + base, dtype=np.int64))
        plan = np.concatenate(pieces)
        if self.shuffle:
            for w, start in enumerate(range(0, len(plan), self.shuffle_buffer)):
                rng = np.random.default_rng([self.seed, epoch, self.dp_rank, w])
                window = plan[start:start + self.shuffle_buffer]
                plan[start:start + self.shuffle_buffer] = window[rng.permutation(len(window))]
        return plan


class _BatchStream(IterableDataset):
    """This rank's batches from global batch index `start` on (forever for train, to the end of
    epoch 0 for validation); DataLoader worker w of W builds batches start + w, start + w + W, ...
    """

    def __init__(self, layout: _Layout, shards: list[ShardInfo], root: Path, *, start: int,
                 sample_len: int, dtype: str, pad_id: int, skip_corrupt: bool, cache_shards: int):
        self.layout, self.shards, self.root, self.start = layout, shards, root, start
        self.sample_len, self.dtype, self.pad_id = sample_len, np.dtype(dtype), pad_id
        self.skip_corrupt, self.cache_shards = skip_corrupt, cache_shards
        self.offsets = np.asarray(layout.offsets, dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        steps, batch = self.layout.steps_per_epoch, self.layout.batch_size
        end = None if self.layout.shuffle else steps
        cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        plan_epoch, plan = -1, None
        for g in itertools.count(self.start + worker, workers):
            if end is not None and g >= end:
                return
            epoch, j = divmod(g, steps)
            if epoch != plan_epoch:
                plan_epoch, plan = epoch, self.layout.plan(epoch)
            yield self._batch(plan[j * batch:(j + 1) * batch], cache)

    def _shard(self, index: int, cache: OrderedDict) -> np.ndarray | None:
        if index in cache:
            cache.move_to_end(index)
            return cache[index]
        shard = self.shards[index]
        try:
            data = read_shard(self.root / shard.file, sample_len=self.sample_len, dtype=self.dtype,
                              expected_samples=shard.samples, expected_sha256=shard.sha256)
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
    """Batches `{"input_ids", "labels"}` of shape `[batch_size, seq_len]` for one data-parallel rank.

    `split="train"` iterates forever over epochs (reshuffled per epoch); `split="val"` is one
    ordered pass per `iter()`. See the module docstring for the layout and the guarantees.
    """

    def __init__(self, manifest: Manifest | str | Path, *, split: str = "train", batch_size: int,
                 dp_rank: int, dp_size: int, seed: int = 0, num_workers: int = 0,
                 shuffle_buffer: int = 4096, on_corrupt: str = "error"):
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.split, self.batch_size = split, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers, self.shuffle_buffer, self.on_corrupt = num_workers, shuffle_buffer, on_corrupt
        self.shuffle = split == "train"

        self.skipped_shards: list[str] = []
        self._shards: list[ShardInfo] = []
        for shard in self.manifest.shards(split):
            problem = _shard_problem(self.manifest.root / shard.file, shard)
            if problem is None:
                self._shards.append(shard)
            elif on_corrupt == "skip":
                log.warning("shard %s %s; left out (on_corrupt='skip')", shard.file, problem)
                self.skipped_shards.append(shard.file)
            else:
                raise ShardError(f"shard {self.manifest.root / shard.file} {problem}; re-run "
                                 f"`prepare`, or set data.on_corrupt=skip to leave it out")
        sizes = [s.samples for s in self._shards]
        offsets = [0] + list(itertools.accumulate(sizes))[:-1]
        self.samples = sum(sizes)
        per_step = batch_size * dp_size
        self.steps_per_epoch = self.samples // per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"split {split!r} of {self.manifest.path} has {self.samples} usable "
                             f"samples, fewer than dp_size * batch_size = {per_step}: lower the "
                             f"batch size or prepare more data (or a larger val_fraction)")
        self.dropped_per_epoch = self.samples - self.steps_per_epoch * per_step
        self._layout = _Layout(sizes=tuple(sizes), offsets=tuple(offsets), seed=seed,
                               dp_rank=dp_rank, batch_size=batch_size,
                               steps_per_epoch=self.steps_per_epoch, shuffle=self.shuffle,
                               shuffle_buffer=shuffle_buffer)
        # Enough decoded shards per worker to cover a shuffle window without re-reading.
        self._cache_shards = math.ceil(shuffle_buffer / max(1, min(s for s in sizes if s > 0))) + 2
        self.epoch = 0
        self.step = 0  # batches of the current epoch already handed out
        self.masked_samples = 0

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current (epoch, step) on; the position advances as batches are taken.

        DataLoader workers are started once per `iter()` (not per epoch) from a forkserver: forking
        the training process itself deadlocked workers after gloo collectives in our tests.
        """
        dataset = _BatchStream(self._layout, self._shards, self.manifest.root,
                               start=self.epoch * self.steps_per_epoch + self.step,
                               sample_len=self.manifest.sample_len, dtype=self.manifest.dtype,
                               pad_id=max(self.manifest.pad_id, 0),
                               skip_corrupt=self.on_corrupt == "skip",
                               cache_shards=self._cache_shards)
        workers = self.num_workers if self.shuffle else min(self.num_workers,
                                                            self.steps_per_epoch - self.step)
        if workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                      multiprocessing_context=worker_context(),
                                      worker_init_fn=_ignore_interrupts))
        for batch in batches:
            if self.on_corrupt == "skip":
                self.masked_samples += int((batch["labels"] == IGNORE_INDEX).all(dim=1).sum())
            self.step += 1
            if self.step == self.steps_per_epoch and self.shuffle:
                self.epoch, self.step = self.epoch + 1, 0
            yield batch
        if not self.shuffle:
            self.epoch, self.step = 0, 0  # the next iter() is a fresh validation pass

    # -- checkpointing ------------------------------------------------------------------------

    def _layout_id(self) -> str:
        return f"{self.manifest.fingerprint()}:{','.join(self.skipped_shards)}"

    def state_dict(self) -> dict:
        """Where the stream stands: (epoch, step) and what must match to resume it exactly.

        Identical on every rank, so saving one rank's state is enough.
        """
        return {"version": STATE_VERSION, "split": self.split, "epoch": self.epoch,
                "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "dp_size": self.dp_size, "shuffle_buffer": self.shuffle_buffer,
                "layout": self._layout_id()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}; it was saved by another version of this code")
        if state["layout"] != self._layout_id():
            raise ValueError("the dataset changed since this loader state was saved (manifest "
                             "shards or skipped shards differ); resume with the same dataset, or "
                             "start the data stream afresh")
        for key in ("split", "seed", "batch_size", "shuffle_buffer"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}; resume with the same setting")
        if state["dp_size"] != self.dp_size and state["step"] != 0:
            raise ValueError(f"the data-parallel size changed from {state['dp_size']} to "
                             f"{self.dp_size} in the middle of epoch {state['epoch']} (step "
                             f"{state['step']}); an exact resume needs the same dp_size. Resume "
                             f"from a checkpoint taken at an epoch boundary to change it")
        if state["step"] > self.steps_per_epoch:
            raise ValueError(f"loader state step {state['step']} exceeds steps_per_epoch "
                             f"{self.steps_per_epoch}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
