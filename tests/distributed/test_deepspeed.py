"""DeepSpeed ZeRO-1/2/3 (and ZeRO-2 with CPU offload) with 2 gloo ranks vs plain single-device PyTorch on the same global
batch: same losses, gradients, gradient norms and weights; and `train` with DeepSpeed in one plain process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_workers import check_against_reference as _check
from trainer_spawn import spawn_ranks
from trainer_workers import deepspeed_cases, plain_reference


@pytest.mark.slow
def test_zero_stages_match_single_device():
    ref = plain_reference([])
    cases = {"zero1": ["parallel.zero_stage=1"], "zero2": ["parallel.zero_stage=2"],
             "zero3": ["parallel.zero_stage=3"],  # partitioned start (parallel.meta_init)
             "zero3-eager-start": ["parallel.zero_stage=3", "parallel.meta_init=false"],
             "zero2+offload": ["parallel.zero_stage=2", "parallel.cpu_offload=true"]}
    ranks = spawn_ranks(deepspeed_cases, 2, cases)
    for name in cases:
        for r in ranks:
            _check(r[name], ref)


def test_deepspeed_trains_in_one_plain_process(tmp_path):
    """No launcher: `init_distributed` says local rank 0, as torchrun would (DeepSpeed asserts on it)."""
    from titans_pretrain.data.prepare import prepare_dataset

    root = Path(__file__).resolve().parents[2]
    prepare_dataset(None, tmp_path / "data", vocab_size=512, seq_len=32, default_corpus_bytes=1 << 18,
                    progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "titans_pretrain", "train", str(root / "configs" / "debug.yaml"),
                           f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'data'}", "train.steps=2",
                           "optim.warmup_steps=1", "train.sample_tokens=0", "parallel.engine=deepspeed"],
                          env=dict(env, OMP_NUM_THREADS="1"), cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "engine deepspeed" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
