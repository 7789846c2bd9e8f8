"""Datasets at URLs, read through webdataset's gopen: a loopback http.server stands in for object
storage, `pipe:cat` for a copy command. The same batches as the local folder; clear errors."""
from __future__ import annotations

import functools
import http.server
import itertools
import threading

import pytest

from data_synthetic import make_dataset, sample_ids
from titans_pretrain.data.loader import ShardLoader
from titans_pretrain.data.location import Location, LocationError
from titans_pretrain.data.manifest import load_manifest
from titans_pretrain.data.shards import ShardError


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A dataset folder and the http:// URL of a loopback server over it."""
    folder = make_dataset(tmp_path / "ds", [9, 4, 13, 6, 1, 7], [5, 6]).parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/ds"
    server.shutdown()
    server.server_close()


def batches(where, n=12, **kw):
    loader = ShardLoader(load_manifest(where, cache=kw.pop("cache", None)), batch_size=3,
                         dp_rank=0, dp_size=1, shuffle_buffer=5, **kw)
    return [sample_ids(b) for b in itertools.islice(iter(loader), n)]


def test_http_file_and_pipe_urls_give_the_local_stream(served, tmp_path):
    folder, url = served
    local = batches(folder)
    assert batches(url) == local
    assert batches(url + "/", num_workers=2) == local
    assert batches(f"file://{folder}") == local
    listed = f"pipe:cat {folder}/{{train-{{00000..00005}},val-{{00000..00001}}}}.tar"
    assert batches(listed) == local
    assert load_manifest(listed).splits.keys() == {"train", "val"}


def test_a_brace_list_selects_shards(served):
    folder, url = served
    manifest = load_manifest(url + "/train-{00000..00002}.tar")
    assert [s.file for s in manifest.shards("train")] == ["train-00000.tar", "train-00001.tar",
                                                          "train-00002.tar"]
    assert "val" not in manifest.splits
    ids = {i for b in batches(url + "/train-{00000..00002}.tar", n=8) for i in b}
    assert ids <= set(range(26))
    with pytest.raises(ValueError, match="lists train-00006.tar, which .* does not have"):
        load_manifest(url + "/train-{00005..00006}.tar")


def test_the_cache_keeps_checked_shards(served, tmp_path):
    folder, url = served
    cache = tmp_path / "cache"
    local = batches(folder)
    assert batches(url, cache=cache) == local
    assert len(list(cache.glob("*/train-*.tar"))) == 6 and not list(cache.glob("*/manifest.json"))
    manifest = load_manifest(url, cache=cache)  # read before the shards go away at the source
    for shard in folder.glob("train-*.tar"):
        shard.unlink()
    loader = ShardLoader(manifest, batch_size=3, dp_rank=0, dp_size=1, shuffle_buffer=5)
    assert [sample_ids(b) for b in itertools.islice(iter(loader), 12)] == local


def test_a_corrupt_or_missing_remote_shard_is_named(served):
    folder, url = served
    data = bytearray((folder / "train-00002.tar").read_bytes())
    data[600] ^= 0xFF
    (folder / "train-00002.tar").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard {url}/train-00002.tar is corrupt: its sha256"):
        batches(url, n=13)
    (folder / "train-00003.tar").unlink()
    with pytest.raises(ShardError, match=f"shard {url}/train-00003.tar cannot be read \\(curl exit 22: HTTP error"):
        batches(url, n=13)


def test_bad_locations_are_clear_errors_never_a_fallback(tmp_path):
    with pytest.raises(LocationError, match=r"scheme 's3' is not supported; use a local folder, "
                                            r"file://, http\(s\):// or pipe:COMMAND"):
        Location("s3://bucket/ds")
    with pytest.raises(LocationError, match="must name the shards"):
        Location("pipe:aws s3 cp s3://bucket/ds -")
    with pytest.raises(LocationError, match=r"http://127.0.0.1:9/ds/manifest.json cannot be read "
                                            r"\(curl exit 7: connection refused\); check that it is"):
        load_manifest("http://127.0.0.1:9/ds")
    with pytest.raises(LocationError, match=r"cannot be read \(the command exited with status 1\)"):
        load_manifest(f"pipe:cat {tmp_path}/none/train-00000.tar")
