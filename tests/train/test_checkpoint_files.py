"""Checkpoint bookkeeping without a model: atomic folders, `latest`, pruning, corruption detection."""
import json

import pytest

from titans_pretrain.config import CheckpointConfig
from titans_pretrain.train import checkpoint as ckpt


def _writer(payload: bytes):
    def write(tmp):
        (tmp / "shard.bin").write_bytes(payload)
        return None
    return write


def _save(mgr, step, payload=b"x" * 100):
    mgr.save(step, _writer(payload), {"step": step}, {"step": step, "engine": "native"}, "run_dir: r\n")


def test_save_is_atomic_and_latest_is_updated(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path, CheckpointConfig(keep_last=2), log=lambda m: None)
    _save(mgr, 10)
    folder = tmp_path / "step_00000010"
    assert (folder / ckpt.MANIFEST).is_file() and (folder / "extra" / "rank_00000.pt").is_file()
    assert (tmp_path / "latest").read_text().strip() == "step_00000010"
    assert not list(tmp_path.glob("*.tmp"))
    files = json.loads((folder / ckpt.MANIFEST).read_text())["files"]
    assert {"shard.bin", "trainer.json", "config.yaml", "extra/rank_00000.pt"} <= set(files)
    assert ckpt.verify_checkpoint(folder) is None
    assert ckpt.read_meta(folder)["step"] == 10


def test_keep_last_and_keep_every(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path, CheckpointConfig(keep_last=2, keep_every=20), log=lambda m: None)
    for step in (10, 20, 30, 40, 50):
        _save(mgr, step)
    names = sorted(p.name for p in ckpt.list_checkpoints(tmp_path))
    assert names == ["step_00000020", "step_00000040", "step_00000050"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000050"


def test_corrupt_and_truncated_checkpoints_fall_back_to_the_previous(tmp_path):
    logs = []
    mgr = ckpt.CheckpointManager(tmp_path, CheckpointConfig(keep_last=5), log=logs.append)
    for step in (1, 2, 3):
        _save(mgr, step, payload=bytes(range(200)))
    # step 3: same size, flipped byte (corrupt); step 2: truncated
    p3 = tmp_path / "step_00000003" / "shard.bin"
    data = bytearray(p3.read_bytes()); data[7] ^= 0xFF; p3.write_bytes(bytes(data))
    p2 = tmp_path / "step_00000002" / "shard.bin"
    p2.write_bytes(p2.read_bytes()[:50])
    assert "CRC32" in ckpt.verify_checkpoint(tmp_path / "step_00000003")
    assert ckpt.verify_checkpoint(tmp_path / "step_00000003", mode="size") is None  # size-only misses it
    assert "truncated" in ckpt.verify_checkpoint(tmp_path / "step_00000002")
    assert mgr.find_resume() == tmp_path / "step_00000001"
    assert any("step_00000003" in m and "corrupt" in m for m in logs)
    assert any("step_00000002" in m and "truncated" in m for m in logs)


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path, CheckpointConfig(), log=lambda m: None)
    _save(mgr, 5)
    partial = tmp_path / "step_00000010.tmp"
    (partial / "extra").mkdir(parents=True)
    (partial / "shard.bin").write_bytes(b"half")
    nomanifest = tmp_path / "step_00000009"
    nomanifest.mkdir()
    assert mgr.find_resume() == tmp_path / "step_00000005"
    _save(mgr, 11)
    assert not partial.exists()
    assert mgr.find_resume() == tmp_path / "step_00000011"


def test_explicit_resume_path_and_none(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path, CheckpointConfig(), log=lambda m: None)
    _save(mgr, 5)
    assert ckpt.CheckpointManager(tmp_path, CheckpointConfig(resume="none")).find_resume() is None
    explicit = ckpt.CheckpointManager(tmp_path, CheckpointConfig(resume=str(tmp_path / "step_00000005")))
    assert explicit.find_resume() == tmp_path / "step_00000005"
    broken = ckpt.CheckpointManager(tmp_path, CheckpointConfig(resume=str(tmp_path / "missing")))
    with pytest.raises(RuntimeError, match="checkpoint.resume"):
        broken.find_resume()


def test_resave_of_the_same_step_replaces_it(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path, CheckpointConfig(), log=lambda m: None)
    _save(mgr, 5, b"old")
    _save(mgr, 5, b"new!")
    assert (tmp_path / "step_00000005" / "shard.bin").read_bytes() == b"new!"
    assert ckpt.verify_checkpoint(tmp_path / "step_00000005") is None


@pytest.mark.parametrize("key, now, legacy", [("mac_output_gate", "sigmoid", "product"),
                                              ("surprise_clip", 0.3, 0.0)])
def test_checkpoint_config_reads_older_checkpoints_as_they_were_trained(tmp_path, key, now, legacy):
    """A checkpoint whose config predates `model.mac_output_gate` holds a product-output MAC (no
    `memory_out_norm` weights), one that predates `model.surprise_clip` was trained with the bare
    memory rule; one that names the key keeps it."""
    from titans_pretrain.config import load_config, save_config

    cfg = load_config(None, ["model.variant=mac"])
    save_config(cfg, tmp_path / "config.yaml")
    assert getattr(ckpt.checkpoint_config(tmp_path).model, key) == now
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text("\n".join(l for l in text.splitlines() if key not in l))
    assert getattr(ckpt.checkpoint_config(tmp_path).model, key) == legacy
