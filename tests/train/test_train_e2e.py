"""End-to-end `titans-pretrain train` on the debug config: run folder, bit-exact resume (after a
planned stop, a SIGKILL in the middle of a save, a corrupt checkpoint), the NaN guard, bad configs."""
import shutil
import subprocess
import sys

import pytest
import torch

from run_helpers import ROOT, env, final_weights, losses, metrics, train

STEPS = 8  # debug.yaml: 8 steps, checkpoint every 4, keep 2


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, data_dir):
    """The uninterrupted reference run (it also samples 4 tokens at the end)."""
    run = tmp_path_factory.mktemp("run_a")
    train(run, data_dir, "train.sample_tokens=4")
    return run


def _same_weights(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_run_folder(run_a):
    from titans_pretrain.config import load_config

    cfg = load_config(run_a / "config.yaml")
    assert cfg.train.steps == STEPS and cfg.run_dir == str(run_a)
    lines = [m for m in metrics(run_a) if "loss" in m]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    for m in lines:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= m.keys()
        for block in (0, 1):  # the memory's per-layer statistics (train/memory_monitor.py)
            assert 0 < m[f"memory_weight_norm_max/{block}"] < 1e3
            assert 0 < m[f"memory_theta_mean/{block}"] < 0.003  # theta_max
        assert m["mfu"] is None  # CPU: no known peak
        assert m["tokens"] == m["step"] * 256 and m["tokens_per_s"] > 0
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.1  # it learns
    ckpts = sorted(p.name for p in (run_a / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000004", "step_00000008"]
    assert (run_a / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    val = [m for m in metrics(run_a) if "val_loss" in m]
    assert len(val) == 1 and val[0]["step"] == STEPS and 0 < val[0]["val_loss"] < lines[0]["loss"]
    assert (run_a / "sample.txt").read_text().startswith("def ")


def test_stop_and_resume_is_bit_exact(run_a, tmp_path, data_dir):
    train(tmp_path, data_dir, "train.stop_at=3")
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    out = train(tmp_path, data_dir, "checkpoint.async_save=true").stdout
    assert "resumed from" in out and "step 3" in out
    assert losses(tmp_path) == losses(run_a)  # exact float equality, every step
    _same_weights(tmp_path, run_a)


def test_resume_names_the_model_keys_it_changes(tmp_path, data_dir):
    train(tmp_path, data_dir, "train.stop_at=2")
    out = train(tmp_path, data_dir, "train.stop_at=3", "model.surprise_clip=0").stdout
    assert "this run changes model.surprise_clip: 0.3 in the checkpoint -> 0.0 now" in out, out[-2000:]
    assert "resumed from" in out


def test_a_torn_metrics_line_does_not_block_resume(tmp_path, data_dir):
    train(tmp_path, data_dir, "train.stop_at=3")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 6.1, "l')  # the last write of a run killed mid-line
    out = train(tmp_path, data_dir, "train.stop_at=5").stdout
    assert "dropped 1 unreadable line(s)" in out and "resumed from" in out
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]  # every line parses, every step once


def test_sigkill_during_save_resumes_from_previous(run_a, tmp_path, data_dir):
    proc = train(tmp_path, data_dir, faults={"kill_in_save_at": 8}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "step_00000008.tmp").is_dir() and not (ckpt / "step_00000008").exists()
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    out = train(tmp_path, data_dir).stdout
    assert "resumed from" in out and "step_00000004" in out
    assert not (ckpt / "step_00000008.tmp").exists()
    assert losses(tmp_path) == losses(run_a)
    _same_weights(tmp_path, run_a)


def test_corrupt_checkpoint_falls_back_to_previous(run_a, tmp_path, data_dir):
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    shard = sorted((run / "checkpoints" / "step_00000008").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = train(run, data_dir, f"run_dir={run}").stdout
    assert "skipping" in out and "step_00000008" in out and "corrupt" in out
    assert losses(run) == losses(run_a)  # steps 5-8 redone (their old lines dropped), identical
    _same_weights(run, run_a)


def test_nan_guard_skips_then_aborts(tmp_path, data_dir):
    ok = train(tmp_path / "a", data_dir, "logging.tensorboard=true", "logging.wandb=offline",
               "parallel.mixed_precision=bf16", "train.deterministic=true", faults={"nan_steps": [2, 3]})
    assert ok.stdout.count("update skipped") == 2
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "a" / "wandb").glob("offline-run-*"))
    last = [m for m in metrics(tmp_path / "a") if "loss" in m][-1]
    assert last["skipped_steps"] == 2 and last["step"] == STEPS
    bad = train(tmp_path / "b", data_dir, "train.max_bad_steps=3", faults={"nan_steps": [2, 3, 4, 5]},
                check=False)
    assert bad.returncode == 3
    assert "3 non-finite steps in a row" in bad.stdout


def test_nan_guard_names_the_diverging_memory(tmp_path, data_dir):
    """The bare rule with an inner step far too large diverges in the first forward: the guard says
    which block's memory went non-finite first, and at which token; the default clip trains on."""
    bad = train(tmp_path / "bare", data_dir, "model.theta_max=50", "model.surprise_clip=0",
                "train.max_bad_steps=2", check=False)
    assert bad.returncode == 3, bad.stdout[-2000:]
    assert bad.stdout.count("the memory of block 0 went non-finite first, at token") == 2, bad.stdout[-2000:]
    ok = train(tmp_path / "clip", data_dir, "model.theta_max=50", "train.steps=3")
    assert "non-finite" not in ok.stdout


def test_bad_config_fails_fast_naming_the_key(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "titans_pretrain", "train", str(ROOT / "configs" / "debug.yaml"),
           "train.stepz=3"]
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "train.stepz" in proc.stderr
    proc = subprocess.run(cmd[:-1] + ["--nproc", "3"], env=env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "micro_batch_size" in proc.stderr


def test_load_checkpoint_into_one_process(run_a):
    from titans_pretrain import load_checkpoint
    from titans_pretrain.models import TitansLM

    model = load_checkpoint(run_a)
    same = load_checkpoint(run_a / "checkpoints" / "step_00000008")
    older = load_checkpoint(run_a / "checkpoints" / "step_00000004")
    assert isinstance(model, TitansLM)
    ids = torch.randint(0, 512, (1, 16))
    assert torch.equal(model(ids).logits, same(ids).logits)
    assert not torch.equal(model(ids).logits, older(ids).logits)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(run_a / "nowhere")
