"""Run `titans-pretrain train` as real subprocesses and read what they leave in the run folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"
FAULTS = Path(__file__).with_name("fault_run.py")


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def train_cmd(run_dir, data_dir, *overrides, nproc=None, faults=None) -> list[str]:
    args = [str(DEBUG), f"run_dir={run_dir}", f"data.path={data_dir}", "train.sample_tokens=0", *overrides]
    if faults is not None:
        return [sys.executable, str(FAULTS), json.dumps(faults), *args]
    base = [sys.executable, "-m", "titans_pretrain", "train", *args]
    return base + (["--nproc", str(nproc)] if nproc else [])


def train(run_dir, data_dir, *overrides, nproc=None, faults=None, check=True, timeout=180):
    proc = subprocess.run(train_cmd(run_dir, data_dir, *overrides, nproc=nproc, faults=faults),
                          env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir) -> dict[int, float]:
    """step -> loss; each step logged once (a resumed run drops lines after its checkpoint)."""
    lines = [m for m in metrics(run_dir) if "loss" in m]
    assert len({m["step"] for m in lines}) == len(lines), "a step was logged twice"
    return {m["step"]: m["loss"] for m in lines}


def final_weights(run_dir) -> dict:
    from titans_pretrain import load_checkpoint

    return {k: v.clone() for k, v in load_checkpoint(run_dir).state_dict().items()}
