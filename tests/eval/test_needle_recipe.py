"""The needle recipe of docs/eval.md, run as documented: `configs/needle_mag.yaml` trained by
`titans-pretrain train` retrieves pass keys that lie far beyond its 16-token attention window, and
the same model with the memory disabled does not."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from titans_pretrain import load_checkpoint
from titans_pretrain.data.tokenizer import Tokenizer
from titans_pretrain.eval.needle import NeedleGenerator
from titans_pretrain.eval.needle_data import write_needle_dataset
from titans_pretrain.eval.needle_eval import evaluate_needles

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mag_recipe_retrieves_beyond_its_window_and_attention_alone_does_not(tmp_path):
    write_needle_dataset(tmp_path / "data", seq_len=64, train_samples=32768)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {True: tmp_path / "mem", False: tmp_path / "nomem"}
    procs = [subprocess.Popen([sys.executable, "-m", "titans_pretrain", "train", str(ROOT / "configs/needle_mag.yaml"),
                               f"data.path={tmp_path / 'data'}", f"run_dir={run}", f"model.use_memory={str(mem).lower()}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for mem, run in runs.items()]  # side by side: one core each
    for proc in procs:
        out, _ = proc.communicate(timeout=840)
        assert proc.returncode == 0, out[-3000:]

    gen = NeedleGenerator(Tokenizer(tmp_path / "data" / "tokenizer.model"), seed=1)  # not the training seed
    accuracy = {}
    for mem, run in runs.items():
        model = load_checkpoint(run).eval()
        assert model.config.window == 16 and model.config.use_memory is mem
        # depth 0 and 0.25 at 96-128 tokens: the needle ends 50-100 tokens before the question
        grid = evaluate_needles(model, gen, "passkey", lengths=[96, 128], depths=[0.0, 0.25], samples=16,
                                piece_len=128)
        accuracy[mem] = grid.mean_accuracy
    assert accuracy[True] >= 0.9, accuracy
    assert accuracy[False] <= 0.2, accuracy
