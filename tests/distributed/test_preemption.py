"""2-process runs through `--nproc 2`: SIGTERM -> agree, save, exit 75, bit-exact resume; resuming
on another data-parallel size; `load_checkpoint` of a sharded checkpoint; the DeepSpeed engine's
own checkpoints resume bit-exactly."""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from run_helpers import final_weights, losses, metrics, train, train_cmd, env, ROOT  # noqa: E402

import subprocess  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from titans_pretrain.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data")
    prepare_dataset(None, out, vocab_size=512, seq_len=32, default_corpus_bytes=1 << 20, progress=False)
    return out


def _same_weights(a, b):
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes_exactly(tmp_path, data_dir):
    steps = ["train.steps=30", "checkpoint.interval=0", "optim.warmup_steps=2"]
    ref = tmp_path / "ref"
    train(ref, data_dir, *steps, nproc=2)
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run, data_dir, *steps, nproc=2), env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(metrics(run)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(15)  # SIGTERM to the launcher, which forwards it to both ranks
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert "stop signal received" in out
    stopped = max(losses(run))
    assert 3 <= stopped < 30
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    # another data-parallel size mid-epoch: a clear error, nothing changed
    other = train(run, data_dir, *steps, check=False)
    assert other.returncode == 1 and "data-parallel" in other.stdout
    out = train(run, data_dir, *steps, nproc=2).stdout
    assert f"step {stopped}" in out
    assert losses(run) == losses(ref)
    _same_weights(run, ref)  # load_checkpoint of a 2-rank FSDP checkpoint, in one process


@pytest.mark.slow
def test_deepspeed_zero2_stop_and_resume_exactly(tmp_path, data_dir):
    ds = ["parallel.engine=deepspeed", "parallel.zero_stage=2"]
    ref = tmp_path / "ref"
    train(ref, data_dir, *ds, nproc=2)
    run = tmp_path / "run"
    train(run, data_dir, *ds, "train.stop_at=3", nproc=2)
    wrong = train(run, data_dir, "parallel.engine=native", check=False)
    assert wrong.returncode == 1 and "deepspeed engine" in wrong.stdout
    train(run, data_dir, *ds, nproc=2)
    assert losses(run) == losses(ref)
    assert losses(ref)[8] < losses(ref)[1]
    _same_weights(run, ref)  # load_checkpoint of a ZeRO checkpoint


@pytest.mark.slow
def test_resume_on_another_dp_size_at_an_epoch_boundary(tmp_path):
    """2 ranks train exactly one epoch and stop; 1 rank resumes: model and optimizer resharded, the
    data stream continues with epoch 1 laid out for the new size."""
    import argparse

    from titans_pretrain.data.manifest import load_manifest
    from titans_pretrain.data.prepare import prepare_dataset

    text = tmp_path / "small.py"
    text.write_text(Path(argparse.__file__).read_text()[:6000])
    data = tmp_path / "data"
    prepare_dataset([str(text)], data, vocab_size=512, seq_len=32, val_fraction=0.0, progress=False)
    samples = load_manifest(data).splits["train"].samples
    epoch = samples // 4  # optimizer steps per epoch: 2 ranks x micro batch 2, no accumulation
    assert 5 <= epoch <= 40, samples
    args = ["train.global_batch_tokens=128", f"train.steps={epoch + 3}", "checkpoint.interval=0"]
    run = tmp_path / "run"
    train(run, data, *args, f"train.stop_at={epoch}", nproc=2)
    out = train(run, data, *args).stdout  # one process: grad accumulation 2 instead of 2 ranks
    assert "data-parallel size 2 -> 1" in out
    seen = losses(run)
    assert sorted(seen) == list(range(1, epoch + 4))
    assert abs(seen[epoch + 1] - seen[epoch]) < 0.5  # continues from the trained weights
    assert seen[epoch + 3] < seen[1]
