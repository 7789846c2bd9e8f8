"""prepare: formats, packing accounting, determinism, caching, atomicity, bad inputs, CLI."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from titans_pretrain.cli import main as cli_main
from titans_pretrain.data import prepare as prepare_mod
from titans_pretrain.data.loader import ShardLoader
from titans_pretrain.data.manifest import load_manifest
from titans_pretrain.data.prepare import prepare_dataset
from titans_pretrain.data.shards import read_shard
from titans_pretrain.data.sources import InputError
from titans_pretrain.data.tokenizer import Tokenizer

WORDS = ("memory surprise gradient momentum forgetting attention chunk token layer segment "
         "neural long term test time learning").split()
FAST = dict(vocab_size=400, seq_len=31, shard_samples=16, progress=False)


def _doc(i: int) -> str:
    rng = np.random.default_rng(i)
    body = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 120))))
    return f"Document {i}: ünïcode — 日本 😀\t{body}\n  indented  line\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder mixing every supported format; returns (folder, list of all documents)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [_doc(i) for i in range(120)]
    (root / "sub").mkdir()
    with open(root / "a.jsonl", "w") as f:
        for d in docs[:40]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with gzip.open(root / "sub" / "b.jsonl.gz", "wt") as f:
        for d in docs[40:70]:
            f.write(json.dumps({"text": d}) + "\n")
    import zstandard
    (root / "sub" / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[70].encode()))
    (root / "d.txt").write_text(docs[71])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs[72:120]}), root / "e.parquet")
    (root / "notes.bin").write_bytes(b"\x00ignored")  # unsupported files in folders are ignored
    # prepare reads files in sorted path order: a.jsonl, d.txt, e.parquet, sub/b..., sub/c...
    return root, docs[:40] + docs[71:120] + docs[40:71]


@pytest.fixture(scope="module")
def tokenizer_file(corpus, tmp_path_factory):
    """A tokenizer trained on the corpus, for inputs too small to train a 400-piece one."""
    from titans_pretrain.data.tokenizer import train_tokenizer
    return str(train_tokenizer(corpus[1], tmp_path_factory.mktemp("tok") / "t.model", vocab_size=400))


def _decoded_segments(manifest, split):
    tok = Tokenizer(manifest.tokenizer_path)
    rows = [read_shard(manifest.root / s.file, sample_len=manifest.sample_len,
                       dtype=np.dtype(manifest.dtype), expected_samples=s.samples)
            for s in manifest.shards(split)]
    ids = np.concatenate(rows).reshape(-1) if rows else np.empty(0, dtype=np.int64)
    cuts = np.nonzero(ids == tok.eos_id)[0]
    segments, start = [], 0
    for cut in cuts:
        segments.append(tok.decode(ids[start:cut].tolist()))
        start = cut + 1
    return segments, len(ids)


def test_prepare_mixed_folder_is_lossless_and_accounted(corpus, tmp_path):
    root, docs = corpus
    path = prepare_dataset([str(root)], tmp_path / "ds", val_fraction=0.2, **FAST)
    m = load_manifest(path)
    t = m.totals
    assert t.files == 5 and t.documents == 120 and t.empty_documents == 0
    stored = sum(split.samples for split in m.splits.values()) * m.sample_len
    assert stored + t.dropped_tokens == t.tokens  # every token is stored or counted as dropped
    assert t.dropped_tokens < 2 * m.sample_len
    assert m.splits["val"].samples > 0 and m.splits["train"].samples > 0
    shards = m.shards("train")
    assert all(s.samples == 16 for s in shards[:-1]) and 0 < shards[-1].samples <= 16
    # Documents come back exactly (lossless tokenizer + packing), in order, split by document.
    train, _ = _decoded_segments(m, "train")
    val, _ = _decoded_segments(m, "val")
    assert set(train).isdisjoint(val)
    for segments in (train, val):
        positions = [docs.index(s) for s in segments]
        assert positions == sorted(positions)
    assert len(train) + len(val) >= 118  # at most the final, truncated document of each split
    # The shards are standard webdataset shards.
    import webdataset as wds
    first = next(iter(wds.WebDataset(str(m.root / shards[0].file), shardshuffle=False,
                                     empty_check=False).decode()))
    assert first["tokens.npy"].shape == (m.sample_len,)
    # And the loader consumes them.
    batch = next(iter(ShardLoader(m, batch_size=2, dp_rank=0, dp_size=1)))
    assert batch["input_ids"].shape == (2, 31) and int(batch["input_ids"].max()) < m.vocab_size


def test_deterministic_across_runs_and_worker_counts(corpus, tmp_path):
    root, _ = corpus
    a = prepare_dataset([str(root)], tmp_path / "a", workers=1, **FAST)
    b = prepare_dataset([str(root)], tmp_path / "b", workers=2, **FAST)
    files = sorted(os.listdir(a.parent))
    assert files == sorted(os.listdir(b.parent))
    for name in files:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name
    c = prepare_dataset([str(root)], tmp_path / "c", seed=1, **FAST)
    assert load_manifest(c).cache_key != load_manifest(a).cache_key


def test_reuse_conflict_and_overwrite(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "ds"
    path = prepare_dataset([str(root)], out, **FAST)
    stamp = path.stat().st_mtime_ns
    assert prepare_dataset([str(root)], out, **FAST) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(FileExistsError, match="other inputs or parameters"):
        prepare_dataset([str(root)], out, **{**FAST, "seq_len": 15})
    rebuilt = prepare_dataset([str(root)], out, overwrite=True, **{**FAST, "seq_len": 15})
    assert load_manifest(rebuilt).seq_len == 15
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a dataset"):
        prepare_dataset([str(root)], tmp_path / "other", **FAST)


def test_crash_leaves_nothing_that_looks_complete(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = tmp_path / "ds"
    good = prepare_dataset([str(root)], out, **FAST)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    calls = []
    original = prepare_mod._SplitWriter._close_shard

    def crash_on_second_shard(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        original(self)

    monkeypatch.setattr(prepare_mod._SplitWriter, "_close_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([str(root)], out, overwrite=True, **{**FAST, "seq_len": 15})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old dataset intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary leftovers
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([str(root)], tmp_path / "fresh", **FAST)
    assert not (tmp_path / "fresh").exists()
    assert load_manifest(good).seq_len == 31


def test_given_tokenizer_is_used_and_copied(corpus, tmp_path):
    root, _ = corpus
    first = load_manifest(prepare_dataset([str(root)], tmp_path / "a", **FAST))
    again = load_manifest(prepare_dataset([str(root / "a.jsonl")], tmp_path / "b",
                                          tokenizer=str(first.tokenizer_path), **FAST))
    assert again.tokenizer_sha256 == first.tokenizer_sha256
    assert again.params["tokenizer_trained"] is False


def test_embedded_default_corpus(tmp_path):
    path = prepare_dataset(None, tmp_path / "std", vocab_size=600, seq_len=64,
                           default_corpus_bytes=400_000, tokenizer_sample_bytes=200_000,
                           progress=False)
    m = load_manifest(path)
    assert m.params["source"] == "default" and m.totals.files > 3
    assert all(src["path"].endswith(".py") for src in m.totals.sources)
    assert 300_000 < m.totals.bytes < 500_000
    assert m.splits["train"].samples > 100


def test_non_utf8_is_replaced_and_counted_and_empty_documents_skipped(tmp_path, tokenizer_file):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad.txt").write_bytes(b"caf\xe9 ok " * 400 + b"\xff\xfe end")
    with open(folder / "docs.jsonl", "w") as f:
        f.write(json.dumps({"text": ""}) + "\n")
        f.write(json.dumps({"text": "fine text " * 300}) + "\n")
    (folder / "empty.txt").write_text("")
    m = load_manifest(prepare_dataset([str(folder)], tmp_path / "ds", tokenizer=tokenizer_file,
                                      **FAST))
    assert m.totals.replaced_bytes == 402
    assert m.totals.documents == 2 and m.totals.empty_documents == 2
    segments, _ = _decoded_segments(m, "train")
    assert segments[0].startswith("caf\ufffd ok")


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "holds no supported input files"),
    (lambda d: (d / "e.txt").write_text(""), "no non-empty documents"),
    (lambda d: (d / "x.jsonl").write_text('{"body": "hi"}\n'), r"x.jsonl:1: no field 'text'"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "hi"}\n{oops\n'), r"x.jsonl:2: invalid JSON"),
    (lambda d: (d / "x.txt.gz").write_bytes(b"not gzip at all"), r"cannot read .*x.txt.gz"),
    (lambda d: __import__("pyarrow.parquet").parquet.write_table(
        __import__("pyarrow").table({"body": ["a"]}), d / "x.parquet"), r"no column 'text'"),
])
def test_bad_inputs_have_clear_errors_and_write_nothing(tmp_path, make, message, tokenizer_file):
    folder = tmp_path / "in"
    folder.mkdir()
    make(folder)
    for tokenizer in (None, tokenizer_file):  # with a trained and a given tokenizer
        with pytest.raises(InputError, match=message):
            prepare_dataset([str(folder)], tmp_path / "ds", tokenizer=tokenizer, **FAST)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_corpus_smaller_than_one_sample(tmp_path, tokenizer_file):
    (tmp_path / "x.txt").write_text("short")
    with pytest.raises(InputError, match="too small"):
        prepare_dataset([str(tmp_path / "x.txt")], tmp_path / "ds", tokenizer=tokenizer_file, **FAST)
    assert not (tmp_path / "ds").exists()


def test_missing_input_and_unsupported_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare_dataset([str(tmp_path / "nope")], tmp_path / "ds", **FAST)
    with pytest.raises(InputError, match="no inputs given"):
        prepare_dataset([], tmp_path / "ds", **FAST)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(InputError, match="unsupported file type"):
        prepare_dataset([str(tmp_path / "x.csv")], tmp_path / "ds", **FAST)


def test_cli_prepare_glob_and_error(corpus, tmp_path, capsys):
    root, _ = corpus
    rc = cli_main(["prepare", "--input", f"{root}/**/*.jsonl*", "--output", str(tmp_path / "ds"),
                   "--vocab-size", "400", "--seq-len", "31", "--workers", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "70 documents" in out and "manifest:" in out
    rc = cli_main(["prepare", "--input", str(tmp_path / "missing"), "--output",
                   str(tmp_path / "x")])
    assert rc == 1 and "does not exist" in capsys.readouterr().err


def test_every_sample_traces_to_its_file_document_and_token(corpus, tmp_path):
    from titans_pretrain.data.provenance import trace

    root, docs = corpus
    manifest = load_manifest(prepare_dataset([str(root)], tmp_path / "p", val_fraction=0.2, **FAST))
    tok = Tokenizer(manifest.tokenizer_path)
    files = ["a.jsonl"] * 40 + ["d.txt"] + ["e.parquet"] * 48 + ["b.jsonl.gz"] * 30 + ["c.txt.zst"]
    firsts = {0: 0, 40: 0, 41: 0, 89: 0, 119: 0}
    for split in ("train", "val"):
        rows = np.concatenate([read_shard(manifest.root / s.file, sample_len=manifest.sample_len,
                                          dtype=np.dtype(manifest.dtype), expected_samples=s.samples)
                               for s in manifest.shards(split)])
        for index in range(0, len(rows), 7):
            t = trace(manifest, split, index)
            assert t["file"].endswith(files[t["document"]]), t
            assert t["document_in_file"] == t["document"] - max(k for k in firsts if k <= t["document"])
            ids = tok.encode(docs[t["document"]]) + [tok.eos_id]
            head = ids[t["token"]:t["token"] + manifest.sample_len]
            assert rows[index][:len(head)].tolist() == head, t
