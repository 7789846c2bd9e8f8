"""The checkpoint tools under tools/, run as users run them: on a real run folder."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))

from run_helpers import env, train  # noqa: E402


def tool(*args, check=True):
    proc = subprocess.run([sys.executable, *map(str, args)], env=env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from titans_pretrain.data.prepare import prepare_dataset

    data = tmp_path_factory.mktemp("data")
    prepare_dataset(None, data, vocab_size=512, seq_len=32, default_corpus_bytes=1 << 20,
                    val_fraction=0.1, progress=False)
    run = tmp_path_factory.mktemp("run")
    train(run, data, "train.stop_at=8", "model.n_persistent=0")  # Megatron's attention has none
    return run


def test_inspect_and_verify(run, tmp_path):
    out = tool("tools/checkpoint.py", "inspect", run).stdout
    run_id = (run / "run.json").read_text().split('"')[3]
    assert "latest -> step_00000008" in out and "step_00000008: step 8, 2,048 tokens, engine native" in out
    assert f"run {run_id}" in out and "model mac d_model 32 x 2 layers" in out
    assert tool("tools/checkpoint.py", "verify", run).stdout.count(": ok") == 2
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    shard = sorted((copy / "checkpoints" / "step_00000008").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    bad = tool("tools/checkpoint.py", "verify", copy, check=False)
    assert bad.returncode == 1 and "step_00000008: __0_0.distcp fails its CRC32 check" in bad.stdout
    assert tool("tools/checkpoint.py", "verify", copy / "nope", check=False).returncode == 2
    # reshard: a native checkpoint needs nothing; a damaged one is refused, untouched
    assert "nothing to prepare" in tool("tools/checkpoint.py", "reshard", run).stdout
    damaged = copy / "checkpoints" / "step_00000008"
    before = sorted(p.name for p in damaged.iterdir())
    refused = tool("tools/checkpoint.py", "reshard", damaged, check=False)
    assert refused.returncode == 1 and "fails its CRC32 check" in refused.stderr
    assert sorted(p.name for p in damaged.iterdir()) == before


def test_convert_round_trips_through_hf_and_megatron(run, tmp_path):
    from titans_pretrain import load_checkpoint
    from titans_pretrain.train.checkpoint import write_manifest

    persistent = tmp_path / "persistent"
    subprocess.run(["cp", "-r", str(run), str(persistent)], check=True)
    for step in ("step_00000004", "step_00000008"):  # a MAC with persistent tokens has no twin
        cfg = persistent / "checkpoints" / step / "config.yaml"
        cfg.write_text(cfg.read_text().replace("n_persistent: 0", "n_persistent: 2"))
        write_manifest(cfg.parent)  # an intact checkpoint of a model Megatron cannot hold
    refused = tool("tools/convert.py", "to-megatron", persistent / "checkpoints" / "step_00000004",
                   tmp_path / "no", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "n_persistent=2" in refused.stderr

    tool("tools/convert.py", "to-hf", run, tmp_path / "hf")
    tool("tools/convert.py", "from-hf", tmp_path / "hf", tmp_path / "from_hf", "train.steps=4")
    tool("tools/convert.py", "to-megatron", run, tmp_path / "megatron")
    tool("tools/convert.py", "from-megatron", tmp_path / "megatron", tmp_path / "from_megatron",
         run / "config.yaml", "train.steps=4")
    ours = load_checkpoint(run).state_dict()
    for back in ("from_hf", "from_megatron"):
        theirs = load_checkpoint(tmp_path / back).state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (back, name)
