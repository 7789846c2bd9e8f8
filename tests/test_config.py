"""Config loading: YAML + dotted overrides, and errors that name the key and the fix."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from titans_pretrain.config import ConfigError, load_config, resolve_layout, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_debug_config_loads_with_typed_overrides():
    cfg = load_config(CONFIGS / "debug.yaml", ["train.steps=3", "model.variant=mag", "optim.lr=1e-3",
                                               "run_dir=runs/x", "optim.no_decay=bias,norm"])
    assert cfg.train.steps == 3 and isinstance(cfg.train.steps, int)
    assert cfg.model.variant == "mag" and cfg.optim.lr == 1e-3 and cfg.run_dir == "runs/x"
    assert cfg.optim.no_decay == ["bias", "norm"]
    assert type(cfg.model).__name__ == "TitansConfig"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.model.vocab_size >= 1


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "debug.yaml", ["train.seed=7", "parallel.dp_shard=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("override, words", [
    (["train.stepz=3"], ["train.stepz", "steps"]),
    (["bogus.key=1"], ["bogus.key", "model"]),
    (["model.not_a_field=1"], ["model.not_a_field"]),
    (["train.steps=abc"], ["train.steps", "integer"]),
    (["train.steps=0"], ["train.steps", "> 0"]),
    (["parallel.engine=megatron"], ["parallel.engine", "native"]),
    (["train.deterministic=maybe"], ["train.deterministic", "true or false"]),
    (["model.variant=xyz"], ["variant", "mac"]),
    (["train.global_batch_tokens=100"], ["train.global_batch_tokens", "data.seq_len"]),
    (["parallel.cp=3"], ["parallel.cp=3", "data.seq_len"]),
    (["parallel.zero_stage=4"], ["parallel.zero_stage"]),
    (["optim.warmup_steps=50"], ["optim.warmup_steps", "train.steps"]),
    (["parallel.data_parallel=ddp", "parallel.dp_replicate=2"], ["dp_replicate", "fsdp"]),
    (["noequals"], ["section.key=value"]),
    (["run_dir="], ["run_dir is empty", "current directory", "run_dir=runs/NAME"]),
    (["data.on_corrupt=ignore"], ["data.on_corrupt", "'error', 'skip'"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "debug.yaml", override)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, message", [
    ("model:\n  d_model: [32\ntrain:\n  steps: 3\n",
     "not valid YAML at line 3 column 6: expected ',' or ']', but got ':'"),
    ("model:\n\tvariant: mac\n", "not valid YAML at line 2 column 1: found character '\\t'"),
    ("- model\n- train\n", "the top level must be a mapping of sections (model:, train:, ...), got a list"),
    ("just words\n", "the top level must be a mapping of sections (model:, train:, ...), got a string"),
])
def test_a_malformed_file_names_the_place(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)


def test_train_reports_a_malformed_file_without_a_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: [3\n")
    proc = subprocess.run([sys.executable, "-m", "titans_pretrain", "train", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=CONFIGS.parent, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"config error: {path}: not valid YAML at line 3 column 1:"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_layout_arithmetic_and_impossible_combinations():
    cfg = load_config(CONFIGS / "debug.yaml")  # 256 tokens = 8 seqs of 32, micro 2
    one = resolve_layout(cfg, 1)
    assert (one.dp_size, one.grad_accum, one.global_batch_seqs) == (1, 4, 8)
    two = resolve_layout(cfg, 2)
    assert (two.dp_shard, two.grad_accum) == (2, 2)
    hsdp = resolve_layout(load_config(CONFIGS / "debug.yaml", ["parallel.dp_replicate=2"]), 4)
    assert (hsdp.dp_replicate, hsdp.dp_shard, hsdp.dp_size, hsdp.grad_accum) == (2, 2, 4, 1)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        resolve_layout(cfg, 3)  # 8 sequences do not split over 3 ranks
    with pytest.raises(ConfigError, match="dp_shard"):
        resolve_layout(load_config(CONFIGS / "debug.yaml", ["parallel.dp_shard=4"]), 2)
    with pytest.raises(ConfigError, match="dp_replicate"):
        resolve_layout(load_config(CONFIGS / "debug.yaml", ["parallel.dp_replicate=2"]), 3)
