"""Training from a URL equals training from the same shards on disk: a loopback http.server (with
a shard cache) and a brace-listed `pipe:cat`; an unreachable or unsupported URL stops at start."""
import functools
import http.server
import threading

from run_helpers import ROOT, losses, train


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_and_pipe_urls_train_like_the_local_folder(tmp_path, data_dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(data_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        args = ["train.steps=4", "checkpoint.interval=0", "train.sample_tokens=4"]
        train(tmp_path / "local", data_dir, *args)
        ref = losses(tmp_path / "local")
        train(tmp_path / "http", url, *args, f"data.cache={tmp_path / 'cache'}")
        assert losses(tmp_path / "http") == ref
        assert list((tmp_path / "cache").glob("*/train-*.tar"))
        names = ",".join(sorted(p.stem for p in data_dir.glob("*.tar")))
        train(tmp_path / "pipe", f"pipe:cat {data_dir}/{{{names}}}.tar", *args[:2])
        assert losses(tmp_path / "pipe") == ref
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_or_unsupported_url_is_a_config_error(tmp_path, data_dir):
    proc = train(tmp_path / "run", "http://127.0.0.1:9/dataset", check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("config error: data.path=http://127.0.0.1:9/dataset: http://127.0.0.1:9/dataset/manifest.json "
            "cannot be read (curl exit 7: connection refused); check that it is reachable from this "
            "machine and holds the prepared dataset") in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (ROOT / "http:").exists()
    proc = train(tmp_path / "run", "s3://bucket/dataset", check=False)
    assert proc.returncode == 2
    assert ("config error: data.path=s3://bucket/dataset: the scheme 's3' is not supported; use a "
            "local folder, file://, http(s):// or pipe:COMMAND") in proc.stderr
