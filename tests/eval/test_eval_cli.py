"""`titans-pretrain eval` end to end on a real (tiny, briefly trained) checkpoint of the trainer."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from titans_pretrain.cli import main as cli_main
from titans_pretrain.data.manifest import load_manifest
from titans_pretrain.eval.eval_cli import _dataset_path
from titans_pretrain.eval.needle_data import write_needle_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A needle dataset (seq_len 64) and a 3-step MAC run trained on it by `titans-pretrain train`."""
    base = tmp_path_factory.mktemp("evalrun")
    write_needle_dataset(base / "data", seq_len=64, train_samples=48, val_samples=24, shard_samples=16)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "titans_pretrain", "train", str(ROOT / "configs/needle_mac.yaml"),
           f"data.path={base / 'data'}", f"run_dir={base / 'run'}", "data.seq_len=64", "model.segment_len=16",
           "train.steps=3", "optim.warmup_steps=1", "train.global_batch_tokens=256", "train.micro_batch_size=4",
           "train.val_batches=1", "logging.interval=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return base


def test_eval_writes_results_and_figures(run_dir, capsys):
    out = run_dir / "eval"
    code = cli_main(["eval", str(run_dir / "run"), "--task", "ppl", "needle", "streaming", "--out", str(out),
                     "--lengths", "64", "96", "--depths", "0", "0.5", "1", "--samples", "2",
                     "--needle-tasks", "passkey", "number", "word", "--ppl-lengths", "32", "128",
                     "--ppl-streams", "3", "--stream-tokens", "512", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["variant"] == "mac" and res["model"]["attention_span"] == 16
    ppl = res["ppl"]
    assert ppl["lengths"] == [32, 128] and ppl["streams"] == 3
    assert all(p > 1.0 for p in ppl["perplexity"]) and ppl["bins"][-1][1] == 128
    for task in ("passkey", "number", "word"):
        grid = res["needle"][task]
        assert grid["lengths"] == [64, 96] and grid["depths"] == [0.0, 0.5, 1.0]
        assert len(grid["accuracy"]) == 3 and all(len(r) == 2 for r in grid["accuracy"])
        assert all(0.0 <= a <= 1.0 for r in grid["accuracy"] + grid["token_accuracy"] for a in r)
        assert (out / f"needle_{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "loss_by_position.png").read_bytes()[:4] == b"\x89PNG"
    points = res["streaming"]["points"]
    assert [p["tokens"] for p in points] == [64 * k for k in range(1, 9)]
    assert len({p["state_bytes"] for p in points}) == 1 and all(p["mean_loss"] > 1.0 for p in points)


def test_results_accumulate_and_ppl_ignores_other_lengths(run_dir, capsys):
    """Tasks run one at a time end up side by side; perplexity at a length is the same whether or not
    a longer length (which would cut the streams differently) is asked for in the same run."""
    out = run_dir / "eval_acc"
    common = ["eval", str(run_dir / "run"), "--out", str(out), "--device", "cpu", "--ppl-streams", "3"]
    assert cli_main(common + ["--task", "ppl", "--ppl-lengths", "32", "128"]) == 0, capsys.readouterr().err
    first = json.loads((out / "results.json").read_text())["ppl"]
    assert cli_main(common + ["--task", "needle", "--needle-tasks", "passkey", "--lengths", "64", "--depths", "0",
                              "--samples", "1"]) == 0, capsys.readouterr().err
    assert cli_main(common + ["--task", "ppl", "--ppl-lengths", "32", "48"]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert [r["tasks"] for r in res["runs"]] == [["ppl"], ["needle"], ["ppl"]]
    assert res["needle"]["passkey"]["lengths"] == [64]
    ppl = res["ppl"]
    assert ppl["lengths"] == [32, 48, 128] and ppl["perplexity"][2] == first["perplexity"][1]
    assert ppl["perplexity"][0] == first["perplexity"][0]  # 32 alone vs with 128 vs with 48
    assert ppl["bins"][-1][1] == 48  # the curve is the newest run's
    (out / "results.json").write_text(json.dumps(dict(res, checkpoint="elsewhere")))
    assert cli_main(common + ["--task", "ppl", "--ppl-lengths", "32"]) == 2
    assert "another --out" in capsys.readouterr().err


def test_lm_eval_task_joins_the_results(run_dir, capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra (pip install -e '.[lmeval]')")
    out = run_dir / "eval_lm"
    common = ["eval", str(run_dir / "run"), "--out", str(out), "--device", "cpu"]
    assert cli_main(common + ["--task", "ppl", "--ppl-lengths", "32", "--ppl-streams", "1"]) == 0
    code = cli_main(common + ["--task", "lm-eval", "--lm-eval-tasks", "titans_cloze", "titans_complete_line",
                              "--limit", "3", "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["ppl"]["lengths"] == [32] and set(res["lm_eval"]) == {"titans_cloze", "titans_complete_line"}
    assert 0.0 <= res["lm_eval"]["titans_cloze"]["metrics"]["acc"] <= 1.0
    assert res["lm_eval"]["titans_cloze"]["samples"] == 3
    hf_config = json.loads((out / "lm_eval" / "hf" / "config.json").read_text())
    assert hf_config["max_position_embeddings"] == 64  # the run's seq_len: lm-eval cuts inputs there
    assert cli_main(common + ["--task", "lm-eval", "--lm-eval-tasks", "no_such_task"]) == 2
    assert "--include-path" in capsys.readouterr().err
    assert cli_main(common + ["--task", "lm-eval", "--include-path", str(run_dir / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_merge_results_keeps_every_entry():
    from titans_pretrain.eval.eval_cli import merge_results

    old = {"checkpoint": "c", "runs": [{"tasks": ["ppl"]}], "needle": {"passkey": 1, "word": 2},
           "ppl": {"lengths": [8, 16], "perplexity": [3.0, 2.0], "mean_loss": [1.1, 0.7], "streams": 2}}
    new = {"checkpoint": "c", "runs": [{"tasks": ["needle", "ppl"]}], "needle": {"word": 5},
           "lm_eval": {"t": 0.5}, "ppl": {"lengths": [16, 32], "perplexity": [2.5, 1.5], "mean_loss": [0.9, 0.4],
                                          "streams": 4, "streams_by_length": [4, 4]}}
    got = merge_results(old, new)
    assert got["needle"] == {"passkey": 1, "word": 5} and got["lm_eval"] == {"t": 0.5} and len(got["runs"]) == 2
    assert got["ppl"]["lengths"] == [8, 16, 32] and got["ppl"]["perplexity"] == [3.0, 2.5, 1.5]
    assert got["ppl"]["streams_by_length"] == [2, 4, 4] and got["ppl"]["streams"] == 4
    assert merge_results(None, new) == new


def test_eval_errors_name_the_fix(run_dir, capsys):
    code = cli_main(["eval", str(run_dir / "run"), "--task", "ppl", "--data", str(run_dir / "nowhere")])
    assert code == 2 and "--data" in capsys.readouterr().err
    code = cli_main(["eval", str(run_dir / "nothing_here"), "--task", "ppl"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = cli_main(["eval", str(run_dir / "data"), "--task", "ppl"])  # exists, holds no checkpoint
    assert code == 2 and "not a checkpoint" in capsys.readouterr().err
    code = cli_main(["eval", str(run_dir / "run"), "--needle-tasks", "haystack"])
    assert code == 2 and "passkey" in capsys.readouterr().err


def test_relative_data_path_is_found_from_the_run_folder(run_dir, tmp_path, monkeypatch):
    """A run started elsewhere with relative `run_dir`/`data.path` still finds its dataset."""
    start = run_dir  # the folder the run would have been started from
    folder = start / "run" / "checkpoints" / "step_00000003"
    cfg = SimpleNamespace(data=SimpleNamespace(path="data"), run_dir="run")
    monkeypatch.chdir(tmp_path)  # not the start folder: "data" does not resolve from here
    found = _dataset_path(folder, cfg, None)
    assert load_manifest(found).seq_len == 64


def test_results_json_is_strict_even_for_a_diverged_model():
    from titans_pretrain.eval.eval_cli import _finite

    assert _finite({"ppl": [1.5, float("nan"), float("inf")], "n": 3}) == {"ppl": [1.5, None, None], "n": 3}
