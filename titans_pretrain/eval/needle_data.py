"""A prepared dataset of needle samples, so that `titans-pretrain train` can learn the task as is.

Writes what `titans-pretrain prepare` writes (a sentencepiece tokenizer, equal-count webdataset
shards, `manifest.json` last), but each stored sample is exactly one needle instance of
`seq_len + 1` tokens instead of packed text: packing would cut needles from their questions. The
tokenizer is trained on the task's own text (filler, templates, digits, a word list), so a small
vocabulary suffices and the model can be tiny.

    python -m titans_pretrain.eval.needle_data --output data/needle --seq-len 256
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

import numpy as np

from titans_pretrain.data.manifest import FORMAT_VERSION, Manifest, SplitInfo, Totals, save_manifest
from titans_pretrain.data.shards import ShardWriter, sha256_file, token_dtype
from titans_pretrain.data.tokenizer import Tokenizer, train_tokenizer
from titans_pretrain.eval.needle import FILLER, TASKS, NeedleGenerator

__all__ = ["main", "training_sequence", "write_needle_dataset"]

TOKENIZER_NAME = "tokenizer.model"
# Whole words the tokenizer learns as pieces: keys and word values of the `number`/`word` tasks.
_WORDS = ("apple river stone cloud maple tiger piano candle forest rocket silver garden violet "
          "bridge falcon harbor meadow pepper saddle thunder walnut zebra copper lantern").split()


def _tokenizer_texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(FILLER) * 4]
    for spec in TASKS.values():
        for _ in range(40):
            key = rng.choice(_WORDS)
            value = "".join(rng.choice("0123456789") for _ in range(7)) if spec.value_kind == "digits" else rng.choice(_WORDS)
            texts.append(spec.needle.format(key=key) + " " + value + spec.needle_end + "\n"
                         + spec.question.format(key=key) + " " + value)
    texts.extend(" ".join(_WORDS) for _ in range(20))
    return texts


def training_sequence(gen: NeedleGenerator, task: str, total: int, rng: random.Random,
                      index: int) -> tuple[list[int], int, int]:
    """One stored sequence of ``total`` tokens: a needle sample of random length and depth, then
    filler up to ``total``. The random length moves the question and answer around: with samples
    of one fixed length a model learns "emit the key at position p" instead of reading the
    question (measured: 100% at the training length, 0% one token shorter). Returns
    ``(ids, answer_start, answer_end)``."""
    low = gen.min_length(task)
    if total < low:
        raise ValueError(f"seq_len + 1 = {total} is shorter than the {task} task's fixed part ({low} tokens)")
    sample = gen.sample(task, rng.randint(low, total), depth=round(rng.random(), 3), index=index)
    tail = (gen.filler_ids * (total // len(gen.filler_ids) + 1))[:total - len(sample.ids)]
    return sample.ids + tail, sample.answer_start, len(sample.ids)


def write_needle_dataset(output: str | Path, *, task: str = "passkey", seq_len: int = 256,
                         train_samples: int = 8192, val_samples: int = 64, vocab_size: int = 512,
                         shard_samples: int = 512, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the dataset to `output` and return its `manifest.json`. Each sequence is
    :func:`training_sequence` (needle depth and sample length uniform); train and validation
    samples come from disjoint generator indices."""
    if task not in TASKS:
        raise ValueError(f"unknown needle task {task!r}; choose from {sorted(TASKS)}")
    out = Path(output)
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset; pass overwrite=True (--overwrite) to replace it")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model_file = train_tokenizer(_tokenizer_texts(seed), out / TOKENIZER_NAME, vocab_size=vocab_size)
    tok = Tokenizer(model_file)
    gen = NeedleGenerator(tok, seed=seed)
    dtype = token_dtype(tok.vocab_size)
    rng = random.Random(seed)
    splits, n_tokens, offset = {}, 0, 0
    for split, count in (("train", train_samples), ("val", val_samples)):
        shards = []
        for first in range(0, count, shard_samples):
            writer = ShardWriter(out / f"{split}-{len(shards):05d}.tar")
            for i in range(first, min(count, first + shard_samples)):
                ids, _, _ = training_sequence(gen, task, seq_len + 1, rng, offset + i)
                writer.add(f"{split}{i:08d}", np.asarray(ids, dtype=dtype))
                n_tokens += len(ids)
            shards.append(writer.close())
        offset += count
        splits[split] = SplitInfo(shards=shards)
    params = {"task": task, "seq_len": seq_len, "train_samples": train_samples, "val_samples": val_samples,
              "vocab_size": vocab_size, "seed": seed, "source": "titans_pretrain.eval.needle_data"}
    manifest = Manifest(
        format_version=FORMAT_VERSION, tokenizer_file=TOKENIZER_NAME, tokenizer_sha256=sha256_file(model_file),
        vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, seq_len=seq_len,
        dtype=dtype.name, splits=splits, totals=Totals(documents=train_samples + val_samples, tokens=n_tokens),
        params=params, cache_key=f"needle:{task}:{seq_len}:{train_samples}:{val_samples}:{vocab_size}:{seed}",
        root=out.resolve())
    return save_manifest(manifest, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titans_pretrain.eval.needle_data", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--task", default="passkey", choices=sorted(TASKS))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-samples", type=int, default=8192)
    p.add_argument("--val-samples", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        path = write_needle_dataset(a.output, task=a.task, seq_len=a.seq_len, train_samples=a.train_samples,
                                    val_samples=a.val_samples, vocab_size=a.vocab_size, seed=a.seed,
                                    overwrite=a.overwrite)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
