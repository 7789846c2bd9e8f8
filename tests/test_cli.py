"""The command line: options and overrides in any order; `config` prints every key with its meaning."""
import sys

import yaml

from titans_pretrain import cli
from titans_pretrain.config import load_config

DEBUG = "configs/debug.yaml"


def test_options_may_follow_overrides(monkeypatch):
    from titans_pretrain.profile import profile_cli

    seen = {}
    monkeypatch.setattr(profile_cli, "run", lambda args: seen.update(vars(args)) or 0)
    monkeypatch.setattr(sys, "argv", ["titans-pretrain"])
    assert cli.main(["profile", DEBUG, "--steps", "5", "run_dir=x", "--warmup", "1", "model.d_model=48"]) == 0
    assert seen["steps"] == 5 and seen["warmup"] == 1
    assert seen["overrides"] == ["run_dir=x", "model.d_model=48"]


def test_config_prints_the_resolved_config_with_every_meaning(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["titans-pretrain"])
    assert cli.main(["config", DEBUG, "optim.lr=0.001", "model.variant=mag"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == load_config(DEBUG, ["optim.lr=0.001", "model.variant=mag"]).to_dict()
    keys = [line for line in text.splitlines() if line.startswith("  ")]
    undocumented = [line for line in keys if "  # " not in line or not line.split("  # ", 1)[1].strip()]
    assert not undocumented, undocumented  # a new config field needs a comment saying what it means
    assert '  lr: 0.001  # peak learning rate (AdamW)' in text


def test_config_names_a_bad_key(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["titans-pretrain"])
    assert cli.main(["config", DEBUG, "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
