"""Helpers of the HF tests: run the real CLI in a fresh process, train a debug run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m titans_pretrain ARGS` in a fresh process, from the repo root."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "titans_pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train(run_dir: Path, data: Path, *extra: str) -> Path:
    proc = run_cli("train", "configs/debug.yaml", "train.steps=2", "optim.warmup_steps=1", f"run_dir={run_dir}",
                   f"data.path={data}", *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir
