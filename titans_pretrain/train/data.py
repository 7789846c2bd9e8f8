"""The trainer's view of the data: prepare once (rank 0), build per-rank loaders, stream forever."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from titans_pretrain.config import ConfigError, RunConfig


def ensure_dataset(cfg: RunConfig, log=print):
    """Return the manifest at `data.path`, preparing the dataset there first if it is missing.
    Rank 0 prepares; the others wait, so the corpus is built exactly once."""
    from titans_pretrain.data.manifest import check_compatible, load_manifest

    path = Path(cfg.data.path)
    given = cfg.data.tokenizer  # checked on every rank, before rank 0 prepares and the rest wait
    if given and not (path / "manifest.json").is_file() and not Path(given).is_file():
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} does not exist (needed to prepare "
                          f"{path}): give an existing sentencepiece .model file, or drop "
                          "data.tokenizer to train one")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (path / "manifest.json").is_file():
        from titans_pretrain.data.prepare import prepare_dataset

        what = "the embedded default corpus" if cfg.data.inputs is None else f"{cfg.data.inputs}"
        log(f"[data] preparing {what} into {path} (once; later runs reuse it)")
        extra = {} if cfg.data.corpus_bytes is None else {"default_corpus_bytes": cfg.data.corpus_bytes}
        prepare_dataset(cfg.data.inputs, str(path), tokenizer=cfg.data.tokenizer,
                        vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len,
                        workers=cfg.data.prepare_workers, val_fraction=cfg.data.val_fraction,
                        seed=cfg.train.seed, **extra)
    if dist.is_initialized():
        dist.barrier()
    manifest = load_manifest(path)
    try:
        check_compatible(manifest, vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len)
    except ValueError as exc:
        raise ConfigError(f"data.path={path}: {exc}") from None
    if cfg.train.sample_tokens and not manifest.tokenizer_path.is_file():
        raise ConfigError(f"data.path={path}: the dataset's tokenizer {manifest.tokenizer_path} is "
                          "missing, and the sample at the end of training (train.sample_tokens="
                          f"{cfg.train.sample_tokens}) decodes with it: restore the file (re-run "
                          "`prepare`) or set train.sample_tokens=0")
    return manifest


def make_loader(manifest, cfg: RunConfig, split: str, dp_rank: int, dp_size: int):
    from titans_pretrain.data.loader import ShardLoader

    return ShardLoader(manifest, split=split, batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank,
                       dp_size=dp_size, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                       on_corrupt=cfg.data.on_corrupt)


def forever(loader) -> Iterator[dict]:
    """Epoch after epoch; the loader's own state records where in which epoch we are."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training split yields no batch for this rank: the dataset is "
                               "smaller than one micro-batch per data-parallel rank; use more data, "
                               "a smaller train.micro_batch_size or fewer processes")
