"""The trainer's view of the data: prepare once (rank 0), build per-rank loaders, stream forever."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from titans_pretrain.config import ConfigError, RunConfig


def ensure_dataset(cfg: RunConfig, log=print):
    """Return the manifest at `data.path`, preparing the dataset there first if it is missing.
    Rank 0 prepares; the others wait, so the corpus is built exactly once."""
    from titans_pretrain.data.location import is_url
    from titans_pretrain.data.manifest import check_compatible, load_manifest

    if cfg.data.sources is not None:
        return _mixture(cfg)
    if is_url(cfg.data.path):
        return _remote_dataset(cfg)
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


def _mixture(cfg: RunConfig):
    """`data.sources`: every source's manifest, checked; the first one carries the list
    (`manifest.mixture = (manifests, weights, names)`) for `make_loader` and the metrics."""
    sources = cfg.data.sources
    if not isinstance(sources, list) or not sources:
        raise ConfigError("data.sources must be a non-empty list of {path: ..., weight: ...}")
    manifests, weights, names = [], [], []
    for i, source in enumerate(sources):
        if not isinstance(source, dict) or set(source) - {"path", "weight", "name"} or "path" not in source:
            raise ConfigError(f"data.sources[{i}]: expected {{path: FOLDER_OR_URL, weight: W, name: N}} "
                              f"(name optional), got {source!r}")
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"data.sources[{i}].weight must be a positive number, got {weight!r}")
        path = str(source["path"])
        if not is_url_or_dataset(path):
            raise ConfigError(f"data.sources[{i}].path={path} holds no prepared dataset (manifest.json): "
                              "prepare it first with `titans-pretrain prepare --output` and the same "
                              "--tokenizer for every source")
        manifests.append(_remote_dataset(cfg, path, f"data.sources[{i}].path"))
        weights.append(float(weight))
        names.append(str(source.get("name") or Path(path.rstrip("/").split("{")[0]).name or f"source{i}"))
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources: names {names} repeat; give each source a distinct name")
    from titans_pretrain.data.loader import _check_mixture

    try:
        _check_mixture(manifests, weights)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    manifests[0].mixture = (manifests, weights, names)
    return manifests[0]


def is_url_or_dataset(path: str) -> bool:
    from titans_pretrain.data.location import is_url

    return is_url(path) or (Path(path) / "manifest.json").is_file()


def _remote_dataset(cfg: RunConfig, where: str | None = None, key: str = "data.path"):
    """The manifest of a dataset at a URL (or of a mixture's source): read, never prepared."""
    from titans_pretrain.data.location import LocationError
    from titans_pretrain.data.manifest import check_compatible, load_manifest

    where = cfg.data.path if where is None else where
    if key == "data.path" and cfg.data.inputs is not None:
        raise ConfigError(f"data.path={where} is a URL and data.inputs is set: a dataset is prepared "
                          "into a local folder; run `titans-pretrain prepare`, publish the folder, "
                          "then train from its URL without data.inputs")
    try:
        manifest = load_manifest(where, cache=cfg.data.cache)
        check_compatible(manifest, vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len)
        if cfg.train.sample_tokens:
            manifest.tokenizer_path  # fetched and hash-checked now, not at the end of training
    except (LocationError, ValueError) as exc:
        text = str(exc)  # location errors already start with "data.path=WHERE"
        text = f"{key}={text[len('data.path='):]}" if text.startswith("data.path=") else f"{key}={where}: {text}"
        raise ConfigError(text) from None
    return manifest


def make_loader(manifest, cfg: RunConfig, split: str, dp_rank: int, dp_size: int,
                global_batch: int | None = None):
    """This dp rank's loader. `global_batch` (sequences per optimizer step, all ranks) fixes the
    stream, so every layout sees the same global batches; None: one micro-batch per rank."""
    from titans_pretrain.data.loader import ShardLoader

    mixture = getattr(manifest, "mixture", None)
    if mixture is not None:
        return ShardLoader(mixture[0], weights=mixture[1], split=split,
                           batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                           global_batch=global_batch, seed=cfg.train.seed,
                           num_workers=cfg.data.num_workers, on_corrupt=cfg.data.on_corrupt)
    return ShardLoader(manifest, split=split, batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank,
                       dp_size=dp_size, global_batch=global_batch, seed=cfg.train.seed,
                       num_workers=cfg.data.num_workers, on_corrupt=cfg.data.on_corrupt)


def val_problem(manifest, need: int) -> str | None:
    """Why validation cannot run (None: it can): too few val samples for one batch on every rank,
    or, in a mixture, a source without val samples (its weight could not be honoured)."""
    mixture = getattr(manifest, "mixture", None)
    if mixture is not None:
        empty = [name for m, name in zip(mixture[0], mixture[2])
                 if "val" not in m.splits or m.splits["val"].samples == 0]
        if empty:
            return f"mixture source(s) {', '.join(empty)} have no val samples"
        samples = sum(m.splits["val"].samples for m in mixture[0])
    else:
        samples = manifest.splits["val"].samples
    if samples < need:
        return f"the val split has {samples} samples, fewer than one batch on every rank ({need})"
    return None


def source_tokens(manifest, loader, seq_len: int) -> dict:
    """`tokens_<name>` per mixture source (global, since the start of the run); {} for one dataset."""
    mixture = getattr(manifest, "mixture", None)
    if mixture is None:
        return {}
    return {f"tokens_{name}": n * seq_len for name, n in zip(mixture[2], loader.source_samples)}


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
