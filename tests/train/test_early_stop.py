"""A stop signal before the first step (a Slurm job preempted or warned while its ranks start up):
exit 75 without a checkpoint, and the next run equals an uninterrupted one, bit for bit."""
import json
import subprocess
import sys
from pathlib import Path

from run_helpers import DEBUG, ROOT, env  # tests/train is on sys.path (pytest rootdir-less import)

SCRIPT = """
import os, signal, sys
from titans_pretrain.config import load_config
from titans_pretrain.train import signals
from titans_pretrain.train.trainer import train
debug, data, tmp = sys.argv[1:]
args = [f"data.path={data}", "train.sample_tokens=0", "train.steps=4", "checkpoint.interval=2"]
signals.catch_early()                  # what every Slurm task does first
os.kill(os.getpid(), signal.SIGUSR1)   # the signal arrives before the trainer exists
print("first", train(load_config(debug, [*args, f"run_dir={tmp}/run"])))
print("again", train(load_config(debug, [*args, f"run_dir={tmp}/run"])))
print("ref", train(load_config(debug, [*args, f"run_dir={tmp}/ref"])))
"""


def _losses(run: Path) -> dict:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


def test_stop_before_the_first_step_leaves_no_checkpoint_and_resumes_exactly(tmp_path):
    from titans_pretrain.data.prepare import prepare_dataset

    prepare_dataset(None, tmp_path / "data", vocab_size=512, seq_len=32, default_corpus_bytes=1 << 20,
                    progress=False)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(DEBUG), str(tmp_path / "data"), str(tmp_path)],
                          env=env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ["first 75", "again 0", "ref 0"] == [x for x in proc.stdout.splitlines() if x[:3] in ("fir", "aga", "ref")]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    assert sorted(_losses(tmp_path / "ref")) == [1, 2, 3, 4]
    assert "nothing new to save at step 0" in proc.stdout
