"""Checkpoint bookkeeping without a model: atomic folders, `latest`, pruning, corruption detection."""
import json
from pathlib import Path

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
    assert (folder / ckpt.MANIFEST).is_file() and (folder / "extra" / "rank_00000.json").is_file()
    assert (tmp_path / "latest").read_text().strip() == "step_00000010"
    assert not list(tmp_path.glob("*.tmp"))
    files = json.loads((folder / ckpt.MANIFEST).read_text())["files"]
    assert {"shard.bin", "trainer.json", "config.yaml", "extra/rank_00000.json"} <= set(files)
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
    assert ckpt.CheckpointManager(tmp_path, CheckpointConfig(resume="none")).find_resume() is None
    mgr = ckpt.CheckpointManager(tmp_path, CheckpointConfig(), log=lambda m: None)
    _save(mgr, 5)
    explicit = ckpt.CheckpointManager(tmp_path, CheckpointConfig(resume=str(tmp_path / "step_00000005")))
    assert explicit.find_resume() == tmp_path / "step_00000005"
    broken = ckpt.CheckpointManager(tmp_path, CheckpointConfig(resume=str(tmp_path / "missing")))
    with pytest.raises(ckpt.ResumeError, match="checkpoint.resume=.*missing does not exist"):
        broken.find_resume()


def test_resume_refuses_to_mix_two_histories_in_one_folder(tmp_path):
    """resume=none beside checkpoints, a rollback with later checkpoints in place, and a folder
    whose checkpoints are all corrupt are refused, naming the cause and the fix."""
    mgr = ckpt.CheckpointManager(tmp_path, CheckpointConfig(keep_last=5), log=lambda m: None)
    for step in (4, 8):
        _save(mgr, step)
    with pytest.raises(ckpt.ResumeError, match="resume=none.*step_00000008.*new run_dir"):
        ckpt.CheckpointManager(tmp_path, CheckpointConfig(resume="none")).find_resume()
    back = ckpt.CheckpointManager(tmp_path, CheckpointConfig(resume=str(tmp_path / "step_00000004")))
    with pytest.raises(ckpt.ResumeError, match="later checkpoints \\(step_00000008\\).*Move the later"):
        back.find_resume()
    for step in (4, 8):
        (tmp_path / ckpt.step_dir_name(step) / "shard.bin").write_bytes(b"y" * 100)
    with pytest.raises(ckpt.ResumeError, match="none of the 2 checkpoint.*is intact"):
        ckpt.CheckpointManager(tmp_path, CheckpointConfig(), log=lambda m: None).find_resume()


def test_pruning_counts_only_verified_checkpoints_of_this_run(tmp_path):
    """Higher-numbered folders of another run, and corrupt ones of this run, never push a new save
    out: the newest saves are kept, `latest` names one that exists, the others are left alone."""
    old = ckpt.CheckpointManager(tmp_path, CheckpointConfig(keep_last=2), log=lambda m: None, run_id="old")
    for step in (8, 12):
        _save(old, step)
    logs = []
    new = ckpt.CheckpointManager(tmp_path, CheckpointConfig(keep_last=2), log=logs.append, run_id="new")
    _save(new, 10)
    (tmp_path / "step_00000010" / "shard.bin").write_bytes(b"z" * 100)  # corrupt after its save
    new._verified.clear()  # as a later process sees it
    for step in (2, 4, 6):
        _save(new, step)
    names = sorted(p.name for p in ckpt.list_checkpoints(tmp_path))
    assert names == ["step_00000004", "step_00000006", "step_00000008", "step_00000010", "step_00000012"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000006"
    assert any("not counting step_00000010" in m and "CRC32" in m for m in logs)
    assert ckpt.read_meta(tmp_path / "step_00000006")["run_id"] == "new"


def test_a_failed_save_names_the_cause_and_leaves_the_previous_intact(tmp_path):
    import errno

    mgr = ckpt.CheckpointManager(tmp_path, CheckpointConfig(), log=lambda m: None)
    _save(mgr, 5)

    def full(tmp):
        (tmp / "shard.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ckpt.CheckpointSaveError, match="step 10 failed: the filesystem refused the "
                       "write \\(No space left on device.*step_00000005\\) is intact. Free space"):
        mgr.save(10, full, {"step": 10}, {"step": 10}, "")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert mgr.find_resume() == tmp_path / "step_00000005"


def test_extra_state_is_json_and_older_pickles_load_without_running_code(tmp_path):
    import random

    import torch

    state = {"loader": {"epoch": 1, "step": 3}, "rng": ckpt.rng_state(), "scheduler": {"last_epoch": 3}}
    draws = (random.random(), torch.rand(3))
    (tmp_path / "extra").mkdir()
    ckpt.write_extra(tmp_path, 0, state)
    [back] = ckpt.load_extras(tmp_path)
    ckpt.set_rng_state(back["rng"])
    assert random.random() == draws[0] and torch.equal(torch.rand(3), draws[1])
    assert back["loader"] == state["loader"]

    legacy = tmp_path / "legacy"
    (legacy / "extra").mkdir(parents=True)
    torch.save(state, legacy / "extra" / "rank_00000.pt")  # how checkpoints used to store it
    [old] = ckpt.load_extras(legacy)
    ckpt.set_rng_state(old["rng"])
    assert random.random() == draws[0]

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"loader": Payload()}, legacy / "extra" / "rank_00000.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        ckpt.load_extras(legacy)
    assert not (tmp_path / "pwned").exists()


def test_readers_verify_checksums_and_fall_back_saying_so(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path / "checkpoints", CheckpointConfig(keep_last=5), log=lambda m: None)
    for step in (1, 2):
        _save(mgr, step, payload=bytes(range(200)))
    shard = tmp_path / "checkpoints" / "step_00000002" / "shard.bin"
    shard.write_bytes(bytes(reversed(range(200))))  # same size: only the CRC32 sees it
    said = []
    assert ckpt.resolve_checkpoint_path(tmp_path, log=said.append) == tmp_path / "checkpoints" / "step_00000001"
    assert any("skipping" in m and "step_00000002" in m and "corrupt" in m for m in said)
    with pytest.raises(ckpt.CorruptCheckpointError, match="CRC32.*newest intact checkpoint beside it is "
                       ".*step_00000001"):
        ckpt.resolve_checkpoint_path(shard.parent)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_checkpoint_path(tmp_path / "nope")


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


def test_crafted_dcp_metadata_fails_verification_before_torch_reads_it(tmp_path):
    """DCP reads `.metadata` with plain pickle: one that names anything but DCP's own classes is
    refused (and a real one passes)."""
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "real"), no_dist=True)  # noqa
    assert ckpt.check_metadata(tmp_path / "real") is None

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    import pickle

    mgr = ckpt.CheckpointManager(tmp_path / "ck", CheckpointConfig(), log=lambda m: None)
    mgr.save(1, lambda tmp: (tmp / ".metadata").write_bytes(pickle.dumps(Payload())), {}, {"step": 1}, "")
    reason = ckpt.verify_checkpoint(tmp_path / "ck" / "step_00000001")
    assert reason.startswith(".metadata refused: it references pathlib.") and "touch" in reason, reason
    assert not (tmp_path / "pwned").exists()
