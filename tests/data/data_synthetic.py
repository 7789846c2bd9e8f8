"""Synthetic datasets for loader tests: sample k of the concatenated shards has every token = k.

Built with the production shard writer and manifest code, so the loader sees real shards, and a
batch row identifies its sample by `input_ids[row, 0]`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from titans_pretrain.data.manifest import (FORMAT_VERSION, Manifest, ShardInfo, SplitInfo, Totals,
                                           save_manifest)
from titans_pretrain.data.shards import ShardWriter

VOCAB = 100_000  # > 2**16, so ids are stored as uint32 and any sample index fits in a token


def make_dataset(folder: Path, train_shards: list[int], val_shards: list[int] = (), *,
                 seq_len: int = 7, first_id: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    splits, next_id = {}, first_id
    for split, sizes in (("train", train_shards), ("val", val_shards)):
        infos = []
        for i, n in enumerate(sizes):
            writer = ShardWriter(folder / f"{split}-{i:05d}.tar")
            for _ in range(n):
                writer.add(f"{next_id:09d}", np.full(seq_len + 1, next_id, dtype=np.uint32))
                next_id += 1
            w = writer.close()
            infos.append(ShardInfo(file=w.file, samples=w.samples, bytes=w.bytes, sha256=w.sha256))
        splits[split] = SplitInfo(shards=infos)
    manifest = Manifest(format_version=FORMAT_VERSION, tokenizer_file="none.model",
                        tokenizer_sha256="", vocab_size=VOCAB, bos_id=1, eos_id=2, pad_id=0,
                        seq_len=seq_len, dtype="uint32", splits=splits, totals=Totals(),
                        params={}, cache_key="synthetic", root=folder)
    return save_manifest(manifest, folder)


def sample_ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()
