"""The trainer's data checks fail at start, naming the cause and the fix: a dataset without its
tokenizer, a tokenizer to prepare with that does not exist, a damaged shard (or, with
`data.on_corrupt=skip`, train on without it and say so)."""
import shutil

from run_helpers import train


def test_a_missing_tokenizer_fails_before_training(tmp_path, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "tokenizer.model").unlink()
    proc = train(tmp_path / "run", data, "train.sample_tokens=4", check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"config error: data.path={data}: the dataset's tokenizer {data / 'tokenizer.model'} is missing, "
            "and the sample at the end of training (train.sample_tokens=4) decodes with it: restore the "
            "file (re-run `prepare`) or set train.sample_tokens=0") in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
    train(tmp_path / "run", data, "train.steps=2", "optim.warmup_steps=1")  # no sample: no tokenizer needed

    proc = train(tmp_path / "new", tmp_path / "new_data", f"data.tokenizer={tmp_path / 'none.model'}", check=False)
    assert proc.returncode == 2
    assert (f"config error: data.tokenizer={tmp_path / 'none.model'} does not exist (needed to prepare "
            f"{tmp_path / 'new_data'}): give an existing sentencepiece .model file, or drop data.tokenizer "
            "to train one") in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "new_data").exists()


def test_a_truncated_shard_stops_or_with_on_corrupt_skip_is_left_out(tmp_path, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shard = data / "train-00003.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])
    proc = train(tmp_path / "run", data, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"error: shard {shard} has {size // 2} bytes, manifest.json says {size} (truncated or replaced); "
            "re-run `prepare`, or set data.on_corrupt=skip to leave it out") in proc.stdout
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
    proc = train(tmp_path / "run", data, "data.on_corrupt=skip", "train.steps=2", "optim.warmup_steps=1")
    assert f"shard train-00003.tar has {size // 2} bytes" in proc.stderr and "left out" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
