"""`data.sources` through `titans-pretrain train`: per-source tokens in metrics.jsonl that follow
the weights, and a run stopped mid-way resumes bit-exactly (losses and per-source counts)."""
import argparse
import json
from pathlib import Path

from run_helpers import losses, metrics, train


def test_a_mixture_logs_tokens_per_source_and_resumes_exactly(tmp_path, data_dir):
    from titans_pretrain.data.prepare import prepare_dataset

    source = Path(argparse.__file__).read_text()[:32000]
    (tmp_path / "text").mkdir()
    for i in range(8):  # documents, so that some land in the val split
        (tmp_path / "text" / f"{i}.py").write_text(source[4000 * i:4000 * (i + 1)])
    code = prepare_dataset([str(tmp_path / "text")], tmp_path / "code", tokenizer=str(data_dir / "tokenizer.model"),
                           seq_len=32, val_fraction=0.4, progress=False)
    sources = json.dumps([{"path": str(data_dir), "weight": 3, "name": "std"},
                          {"path": str(Path(code).parent), "weight": 1}])
    args = [f"data.sources={sources}", "checkpoint.interval=0", "train.steps=12"]
    train(tmp_path / "ref", data_dir, *args)
    train(tmp_path / "run", data_dir, *args, "train.stop_at=5")
    out = train(tmp_path / "run", data_dir, *args).stdout
    assert "resumed from" in out
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    ref = [m for m in metrics(tmp_path / "ref") if "loss" in m]
    assert [m for m in metrics(tmp_path / "run") if "loss" in m][-1]["tokens_code"] == ref[-1]["tokens_code"]
    last = ref[-1]
    assert last["tokens_std"] + last["tokens_code"] == last["tokens"] == 12 * 256
    assert abs(last["tokens_code"] / last["tokens"] - 0.25) < 0.1  # 96 samples: sigma ~0.044
    assert any("val_loss" in m for m in metrics(tmp_path / "ref"))


def test_bad_sources_are_config_errors(tmp_path, data_dir):
    import pytest

    from run_helpers import DEBUG
    from titans_pretrain.config import ConfigError, load_config
    from titans_pretrain.train.data import ensure_dataset

    def check(sources, match):
        cfg = load_config(DEBUG, [f"data.sources={json.dumps(sources)}"])
        with pytest.raises(ConfigError, match=match):
            ensure_dataset(cfg)

    check([{"path": str(tmp_path / "none"), "weight": 1}],
          r"data.sources\[0\].path=.*none holds no prepared dataset \(manifest.json\): prepare it first")
    check([{"path": str(data_dir), "weight": -1}], r"data.sources\[0\].weight must be a positive number, got -1")
    check([{"path": str(data_dir), "wieght": 1}], r"data.sources\[0\]: expected \{path: FOLDER_OR_URL")
    check([{"path": str(data_dir)}, {"path": str(data_dir)}], "names .* repeat; give each source a distinct name")
    check([{"path": "s3://b/ds"}], r"^data.sources\[0\].path=s3://b/ds: the scheme 's3' is not supported")
