"""`titans-pretrain prepare`: the command-line face of `prepare_dataset`."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from titans_pretrain.data import default_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Tokenize a corpus into packed webdataset shards plus manifest.json. "
                          "Without --input, the embedded default corpus (this Python's standard "
                          "library sources) is used.")
    parser.add_argument("--input", nargs="+", metavar="PATH", default=None,
                        help="files, folders (recursive) or globs: .txt, .jsonl, .parquet, "
                             "optionally .gz/.zst (default: the embedded stdlib corpus)")
    parser.add_argument("--output", required=True, metavar="DIR", help="dataset folder to create")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="FILE.model", default=None,
                     help="use this sentencepiece model instead of training one")
    tok.add_argument("--vocab-size", type=int, default=8192,
                     help="vocab size of the trained BPE tokenizer (default 8192)")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="tokens per training sequence; samples hold seq_len + 1 (default 512)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--val-fraction", type=float, default=0.02,
                        help="fraction of documents held out for validation (default 0.02)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-field", default="text",
                        help="JSON field / parquet column holding the text (default 'text')")
    parser.add_argument("--shard-samples", type=int, default=1024,
                        help="samples per shard (default 1024)")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=4.0,
                        help="text used to train the tokenizer, in MB (default 4)")
    parser.add_argument("--default-corpus-mb", type=float,
                        default=default_corpus.DEFAULT_MAX_BYTES / 2**20,
                        help="size cap of the embedded default corpus, in MB (default 8)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, different dataset in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from titans_pretrain.data.manifest import load_manifest
    from titans_pretrain.data.prepare import prepare_dataset, summary
    from titans_pretrain.data.shards import ShardError
    from titans_pretrain.data.sources import InputError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started, started_wall = time.perf_counter(), time.time()
    try:
        path = prepare_dataset(
            args.input, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            seq_len=args.seq_len, workers=args.workers, val_fraction=args.val_fraction,
            seed=args.seed, text_field=args.text_field, shard_samples=args.shard_samples,
            tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 2**20),
            default_corpus_bytes=int(args.default_corpus_mb * 2**20), overwrite=args.overwrite,
            progress=False if args.no_progress else None)
    except (InputError, ShardError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"titans-pretrain prepare: error: {exc}", file=sys.stderr)
        return 1
    reused = path.stat().st_mtime < started_wall  # an existing dataset with the same cache key
    print(summary(load_manifest(path), None if reused else time.perf_counter() - started))
    print(f"manifest: {path}" + ("  (reused: same inputs and parameters)" if reused else ""))
    return 0
