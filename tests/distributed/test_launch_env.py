"""How `train` finds its process group: torchrun env, Slurm env, or a lone process."""
import os

import pytest

from titans_pretrain.distributed import mesh
from titans_pretrain.launch.train_cli import _split_nproc


@pytest.fixture
def restored_environ():
    """`_env_from_slurm` writes os.environ directly: put it back whole, or RANK/WORLD_SIZE/MASTER_*
    leak into every later test's training subprocesses (which then wait for ranks that never come)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


SLURM_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST",
              "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_LAUNCH_NODE_IPADDR")


def _slurm_task(monkeypatch, **env):
    for key in SLURM_KEYS:
        monkeypatch.delenv(key, raising=False)
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "12345", **env}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mesh._env_from_slurm()


def test_slurm_env_maps_to_torch_env(restored_environ, monkeypatch):
    """Master: the first host of the node list (rank 0 runs there); port from the job id."""
    _slurm_task(monkeypatch, SLURM_JOB_NODELIST="gpu-a[07-09,12],gpu-b3", SLURM_LAUNCH_NODE_IPADDR="10.0.0.9")
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu-a07"
    assert os.environ["MASTER_PORT"] == str(20000 + 12345 % 20000)


# One `_slurm_task` per test: a second one would make monkeypatch record (and later put back) the
# values the first wrote, after `restored_environ` has cleaned up.
def test_slurm_step_nodelist_and_user_settings_win(restored_environ, monkeypatch):
    _slurm_task(monkeypatch, SLURM_JOB_NODELIST="n[1-4]", SLURM_STEP_NODELIST="n[3-4]", MASTER_PORT="29500")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("n3", "29500")


def test_slurm_without_node_list_uses_the_launch_node(restored_environ, monkeypatch):
    _slurm_task(monkeypatch, SLURM_LAUNCH_NODE_IPADDR="127.0.0.2")
    assert os.environ["MASTER_ADDR"] == "127.0.0.2"


def test_slurm_hostnames_expands_like_scontrol():
    assert mesh.slurm_hostnames("node[01-03,10],gpu[1-2]-ib[0-1],login") == [
        "node01", "node02", "node03", "node10", "gpu1-ib0", "gpu1-ib1", "gpu2-ib0", "gpu2-ib1", "login"]
    assert mesh.slurm_hostnames("localhost") == ["localhost"]
    with pytest.raises(ValueError, match="node list"):
        mesh.slurm_hostnames("n[a-b]")


def test_torchrun_env_wins_over_slurm(monkeypatch, restored_environ):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    mesh._env_from_slurm()
    assert os.environ["RANK"] == "0"


def test_nproc_may_follow_the_overrides():
    class Args:
        nproc = None
        overrides = ["train.steps=3", "--nproc", "2", "run_dir=x"]
    _split_nproc(Args)
    assert Args.nproc == 2 and Args.overrides == ["train.steps=3", "run_dir=x"]


def test_train_under_torchrun(tmp_path):
    """The launcher's environment alone is enough: no --nproc, two ranks, one run folder."""
    import subprocess
    import sys
    from pathlib import Path

    from titans_pretrain.data.prepare import prepare_dataset

    root = Path(__file__).resolve().parents[2]
    prepare_dataset(None, tmp_path / "data", vocab_size=512, seq_len=32, default_corpus_bytes=1 << 20,
                    progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "titans_pretrain", "train", str(root / "configs" / "debug.yaml"), "train.steps=3",
           "optim.warmup_steps=1", "train.sample_tokens=0", f"run_dir={tmp_path / 'run'}",
           f"data.path={tmp_path / 'data'}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 process(es)" in proc.stdout and "dp=2" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()
