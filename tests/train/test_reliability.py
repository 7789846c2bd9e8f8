"""Hostile-user cases of the run folder and its checkpoints, each as a real `train` subprocess on the
debug config: nothing a user does loses a checkpoint, and no resume is silently wrong."""
import json
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from run_helpers import ROOT, env, losses, metrics, train, train_cmd


def _fail(run_dir, data_dir, *overrides, faults=None, **kw):
    proc = train(run_dir, data_dir, *overrides, faults=faults, check=False, **kw)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def _steps(run_dir) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit())


def test_a_second_run_in_a_used_folder_is_refused_and_deletes_nothing(tmp_path, data_dir):
    """Found: `resume=none` in a folder holding steps 8 and 12 saved 2, 4, 6, pruned them away and
    left `latest` naming a deleted folder; the next run resumed the old run."""
    train(tmp_path, data_dir, "train.steps=12", "train.stop_at=12")
    before = (tmp_path / "config.yaml").read_bytes()
    proc = _fail(tmp_path, data_dir, "checkpoint.resume=none", "train.stop_at=6", "checkpoint.interval=2")
    assert "checkpoint.resume=none" in proc.stdout and "new run_dir" in proc.stdout, proc.stdout[-2000:]
    assert _steps(tmp_path) == [8, 12]
    assert (tmp_path / "config.yaml").read_bytes() == before


def test_resumed_overrides_take_effect_and_are_reported(tmp_path, data_dir):
    """Found: `optim.lr` on resume was ignored (the saved scheduler won) while config.yaml said
    otherwise. Now the schedule and optimizer settings are this run's, and the log says so."""
    train(tmp_path, data_dir, "optim.schedule=constant", "train.stop_at=4")
    out = train(tmp_path, data_dir, "optim.schedule=constant", "optim.lr=1e-3", "optim.weight_decay=0.5",
                "train.stop_at=6").stdout
    assert "optim.lr: 0.003 in the checkpoint -> 0.001 now" in out, out[-2000:]
    assert "optim.weight_decay: 0.1 in the checkpoint -> 0.5 now" in out
    lrs = {m["step"]: m["lr"] for m in metrics(tmp_path) if "lr" in m}
    assert lrs[4] == pytest.approx(3e-3) and lrs[5] == pytest.approx(1e-3) and lrs[6] == pytest.approx(1e-3)
    from titans_pretrain.train.checkpoint import checkpoint_config

    assert checkpoint_config(tmp_path / "checkpoints" / "step_00000006").optim.lr == 1e-3


@pytest.mark.parametrize("change, named", [
    (("model.d_model=48",), "model.d_model: 32 -> 48"),
    (("model.variant=mag",), "model.variant: 'mac' -> 'mag'"),
    (("train.seed=1",), "train.seed: 0 -> 1"),
    (("train.global_batch_tokens=512",), "loader state has global_batch=8 but this loader has global_batch=16"),
])
def test_a_change_the_checkpoint_cannot_follow_is_refused_before_anything_is_written(
        tmp_path, data_dir, change, named):
    train(tmp_path, data_dir, "train.stop_at=4")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    proc = _fail(tmp_path, data_dir, *change)
    assert named in proc.stdout and "cannot continue with this config" in proc.stdout, proc.stdout[-2000:]
    assert "start a new run_dir" in proc.stdout
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


def test_the_nan_guard_never_saves_a_suspect_state(tmp_path, data_dir):
    """Found: after the guard stopped a diverged run, a rerun resumed the diverged state. Now no
    checkpoint is written during a non-finite streak; `latest` stays the last good one."""
    proc = train(tmp_path, data_dir, "checkpoint.interval=2", "train.max_bad_steps=3",
                 faults={"nan_steps": [4, 5, 6]}, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:]
    assert "step 4: not saved, the last step was non-finite" in proc.stdout
    assert _steps(tmp_path) == [2]  # keep_last=2 would otherwise have kept 4 and 6
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    out = train(tmp_path, data_dir).stdout
    assert "resumed from" in out and "step_00000002" in out
    assert all(m["skipped_steps"] == 0 for m in metrics(tmp_path) if "loss" in m)


def test_disk_full_names_the_cause_and_the_restart_resumes(tmp_path, data_dir):
    """A real refused write (RLIMIT_FSIZE below the shard's size, SIGXFSZ ignored): found as
    `unexpected pos 704 vs 598` plus a `.tmp` folder that held the space."""
    train(tmp_path, data_dir, "train.stop_at=4")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, 512 << 10))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.run(train_cmd(tmp_path, data_dir, "train.stop_at=6"), env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=180, preexec_fn=small_files)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "saving the checkpoint of step 6 failed: the filesystem refused the write" in proc.stdout
    assert "the newest checkpoint (step_00000004) is intact" in proc.stdout
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    out = train(tmp_path, data_dir).stdout
    assert "resumed from" in out and "step_00000004" in out
    assert sorted(losses(tmp_path)) == list(range(1, 9))


def _garble(folder, tensor: bool):
    """Overwrite 4 KiB of a shard with 0xFF bytes (same size: only CRC32 notices). With `tensor`,
    inside the largest model tensor's bytes (found through DCP's metadata; they read as NaN in
    fp32), else the shard's first bytes, where DCP's reader expects a serialized header."""
    from torch.distributed.checkpoint import FileSystemReader

    infos = FileSystemReader(str(folder)).read_metadata().storage_data
    if tensor:
        index, info = max(((i, s) for i, s in infos.items() if i.fqn.startswith("model.")),
                          key=lambda item: item[1].length)
        start = info.offset + info.length // 2 - 2048
    else:
        info, start = next(iter(infos.values())), 0
    shard = folder / info.relative_path
    data = bytearray(shard.read_bytes())
    data[start: start + 4096] = b"\xff" * 4096
    shard.write_bytes(bytes(data))


def test_garbled_weights_are_never_resumed_nor_exported(tmp_path, data_dir):
    """Found: `checkpoint.verify=size` resumed garbled weights into NaN losses and ended "done";
    `convert-hf` converted a garbled newest checkpoint with exit 0."""
    train(tmp_path, data_dir, "train.stop_at=8")
    newest = tmp_path / "checkpoints" / "step_00000008"
    saved = newest.parent.parent / "saved"
    shutil.copytree(newest, saved)
    _garble(newest, tensor=True)
    proc = _fail(tmp_path, data_dir, "checkpoint.verify=size", "train.steps=10")
    assert "holds non-finite weights" in proc.stdout and "use hash" in proc.stdout, proc.stdout[-2000:]
    shutil.rmtree(newest)
    shutil.copytree(saved, newest)
    _garble(newest, tensor=False)
    proc = _fail(tmp_path, data_dir, "checkpoint.verify=size", "train.steps=10")
    assert "step_00000008 cannot be read" in proc.stdout and "use hash" in proc.stdout, proc.stdout[-2000:]

    from titans_pretrain import load_checkpoint
    from titans_pretrain.train.checkpoint import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="CRC32"):
        load_checkpoint(newest)
    out = subprocess.run(
        [sys.executable, "-m", "titans_pretrain", "convert-hf", str(tmp_path), str(tmp_path / "hf")],
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipping" in out.stderr and "step_00000008" in out.stderr, out.stderr[-2000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "titans"
    out = train(tmp_path, data_dir, "train.steps=10").stdout  # hash (the default) falls back
    assert "skipping" in out and "resumed from" in out and "step_00000004" in out


def test_a_run_without_checkpoints_restarts_its_log(tmp_path, data_dir):
    """A run that died before its first checkpoint starts over; its lines are redone, not doubled."""
    args = ("train.steps=3", "checkpoint.interval=0", "checkpoint.save_at_end=false")
    train(tmp_path, data_dir, *args)
    first = losses(tmp_path)
    train(tmp_path, data_dir, *args)
    assert losses(tmp_path) == first  # each step once (losses() asserts it), same values


def test_a_dataset_of_another_sequence_length_is_a_config_error(tmp_path, data_dir):
    train(tmp_path, data_dir, "train.stop_at=2")
    proc = _fail(tmp_path, data_dir, "data.seq_len=16", "train.global_batch_tokens=128")
    assert proc.returncode == 2 and "seq_len" in proc.stderr, proc.stderr[-2000:]
