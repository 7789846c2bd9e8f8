"""2-process runs through `--nproc 2`: SIGTERM -> agree, save, exit 75, bit-exact resume; resuming
mid-epoch on 1 and 4 processes matches the uninterrupted run; 1 process, FSDP and ZeRO-3 on 2 see
the same losses; DeepSpeed ZeRO-2 and ZeRO-3 checkpoints resume on 1 process (also with the
universal form prepared offline by `tools/checkpoint.py reshard`); `load_checkpoint` of a sharded checkpoint; the DeepSpeed engine's own checkpoints
resume bit-exactly."""
import shutil
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
    from titans_pretrain.data.manifest import load_manifest

    assert stopped % (load_manifest(data_dir).splits["train"].samples // 8) != 0  # mid-epoch
    # another data-parallel size mid-epoch: the same global batches, so the same losses (to
    # reduction order); 1 process accumulates 4 micro-batches, 4 processes one each
    for nproc in (1, 4):
        other = tmp_path / f"on{nproc}"
        shutil.copytree(run, other)
        out = train(other, data_dir, *steps, nproc=nproc if nproc > 1 else None).stdout
        assert f"data-parallel size 2 -> {nproc}" in out and "continues exactly" in out
        got, want = losses(other), losses(ref)
        assert got.keys() == want.keys()
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), (nproc, step)
    out = train(run, data_dir, *steps, nproc=2).stdout
    assert f"step {stopped}" in out
    assert losses(run) == losses(ref)
    _same_weights(run, ref)  # load_checkpoint of a 2-rank FSDP checkpoint, in one process


@pytest.mark.slow
def test_one_process_fsdp_and_zero3_see_the_same_losses(tmp_path, data_dir):
    """The stream is a function of the global batch, not of the layout: every step's loss agrees
    to reduction order (1e-5 relative) and the loss changes from step to step. The ZeRO-3 run's
    step-4 checkpoint then resumes on 1 process through DeepSpeed's universal checkpoint."""
    zero3 = ["parallel.engine=deepspeed", "parallel.zero_stage=3"]
    runs = {"one": ([], None), "fsdp": ([], 2), "zero3": (zero3 + ["checkpoint.interval=4"], 2)}
    seen = {}
    for name, (args, nproc) in runs.items():
        train(tmp_path / name, data_dir, "checkpoint.interval=0", *args, nproc=nproc)
        seen[name] = losses(tmp_path / name)
    assert sorted(seen["one"]) == list(range(1, 9)) and len(set(seen["one"].values())) == 8
    back = tmp_path / "zero3_on_1"
    shutil.copytree(tmp_path / "zero3", back)
    shutil.rmtree(back / "checkpoints" / "step_00000008")
    (back / "checkpoints" / "latest").write_text("step_00000004\n")
    out = train(back, data_dir, *zero3).stdout
    assert "data-parallel size 2 -> 1" in out and "resumed from" in out
    seen["zero3_on_1"] = losses(back)
    for name in ("fsdp", "zero3", "zero3_on_1"):
        assert seen[name].keys() == seen["one"].keys()
        for step, loss in seen["one"].items():
            assert seen[name][step] == pytest.approx(loss, rel=1e-5, abs=0), (name, step)
    assert not list((back / "checkpoints").glob(".*universal"))  # the converted copy is removed


@pytest.mark.slow
def test_deepspeed_zero2_stop_and_resume_exactly(tmp_path, data_dir):
    """Same size: bit-exact. 2 -> 1 processes: DeepSpeed's universal checkpoint, same losses."""
    ds = ["parallel.engine=deepspeed", "parallel.zero_stage=2"]
    ref = tmp_path / "ref"
    train(ref, data_dir, *ds, nproc=2)
    run = tmp_path / "run"
    train(run, data_dir, *ds, "train.stop_at=3", nproc=2)
    wrong = train(run, data_dir, "parallel.engine=native", check=False)
    assert wrong.returncode == 1 and "deepspeed engine" in wrong.stdout
    one = tmp_path / "one"  # on 1 process: through DeepSpeed's universal checkpoint
    shutil.copytree(run, one)
    out = train(one, data_dir, *ds).stdout
    assert "data-parallel size 2 -> 1" in out and "converting to DeepSpeed's universal form" in out
    assert losses(one).keys() == losses(ref).keys()
    for step, loss in losses(ref).items():
        assert losses(one)[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    assert not list((one / "checkpoints").glob(".*universal"))  # the converted copy is removed
    # the same with the universal form prepared offline: stored in the checkpoint, loaded directly
    prepared = tmp_path / "prepared"
    shutil.copytree(run, prepared)
    tool = [sys.executable, str(ROOT / "tools" / "checkpoint.py")]
    done = subprocess.run([*tool, "reshard", str(prepared)], capture_output=True, text=True)
    assert done.returncode == 0 and "wrote universal/" in done.stdout, done.stdout + done.stderr
    again = subprocess.run([*tool, "reshard", str(prepared)], capture_output=True, text=True)
    assert again.returncode == 0 and "already prepared" in again.stdout
    assert subprocess.run([*tool, "verify", str(prepared)], capture_output=True).returncode == 0
    out = train(prepared, data_dir, *ds).stdout
    assert "loading its universal form, prepared offline" in out and "converting" not in out
    assert losses(prepared) == losses(one)
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
