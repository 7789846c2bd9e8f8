"""Data-path throughput: prepare (tokenize + pack + write) MB/s with 1 and 2 workers, and loader
samples/s with 0 and 2 DataLoader workers, one rank of 4 (its slice of each global batch), a
two-source mixture and shards served over loopback http://, on the embedded default corpus.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_data.py [--corpus-mb 8] [--batches 2000]

Tokenizer training is timed separately (it runs once per dataset on a bounded sample), so the
MB/s columns measure the per-byte pipeline. Prints a markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import itertools
import threading
import os
import platform
import tempfile
import time
from pathlib import Path

from titans_pretrain.data.default_corpus import default_corpus_files
from titans_pretrain.data.loader import ShardLoader
from titans_pretrain.data.manifest import load_manifest
from titans_pretrain.data.prepare import prepare_dataset
from titans_pretrain.data.tokenizer import Tokenizer


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=8.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    corpus_bytes = int(args.corpus_mb * 2**20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        first = prepare_dataset(None, tmp / "first", vocab_size=args.vocab_size,
                                seq_len=args.seq_len, default_corpus_bytes=corpus_bytes,
                                progress=False)
        total = time.perf_counter() - start
        m = load_manifest(first)
        mb = m.totals.bytes / 1e6
        rows.append(("prepare, tokenizer training included, 1 worker", f"{mb / total:.2f} MB/s",
                     f"{total:.1f} s for {mb:.1f} MB"))
        texts = [p.read_text(encoding="utf-8", errors="replace")
                 for p in default_corpus_files(corpus_bytes)]
        tok = Tokenizer(m.tokenizer_path)
        start = time.perf_counter()
        tok.encode_batch(texts)
        seconds = time.perf_counter() - start
        rows.append(("sentencepiece encode alone, 1 thread", f"{mb / seconds:.2f} MB/s",
                     "the per-byte floor of prepare"))
        for workers in (1, 2):
            start = time.perf_counter()
            prepare_dataset(None, tmp / f"w{workers}", tokenizer=str(m.tokenizer_path),
                            seq_len=args.seq_len, default_corpus_bytes=corpus_bytes,
                            workers=workers, progress=False)
            seconds = time.perf_counter() - start
            rows.append((f"prepare with a given tokenizer, {workers} worker(s)",
                         f"{mb / seconds:.2f} MB/s", f"{seconds:.1f} s for {mb:.1f} MB"))
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp / "first")))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        b = args.batch_size
        cases = [(f"loader, 0 DataLoader workers, batch {b}x{args.seq_len}", first, {}),
                 (f"loader, 2 DataLoader workers, batch {b}x{args.seq_len}", first,
                  {"num_workers": 2}),
                 (f"loader, rank 0 of 4, global batch {4 * b}", first,
                  {"dp_size": 4, "global_batch": 4 * b}),
                 ("loader, mixture of 2 sources (weights 3:1)", [first, tmp / "w1"],
                  {"weights": [3, 1]}),
                 ("loader, shards from loopback http:// (curl per shard)", url, {})]
        for name, source, kw in cases:
            kw = {"dp_rank": 0, "dp_size": 1, **kw}
            loader = ShardLoader(source, batch_size=b, **kw)
            start = time.perf_counter()
            batches = iter(loader)
            next(batches)
            warm = time.perf_counter()
            for _ in itertools.islice(batches, args.batches):
                pass
            end = time.perf_counter()
            rows.append((name, f"{args.batches * b / (end - warm):.0f} samples/s",
                         f"first batch after {warm - start:.2f} s"))
        server.shutdown()
    print(f"host: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; corpus: stdlib "
          f"{mb:.1f} MB -> {m.splits['train'].samples} train samples, vocab {m.vocab_size}")
    print("| measurement | throughput | notes |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
