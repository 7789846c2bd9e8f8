"""Shared fixtures for the Hugging Face export tests: an isolated HF cache and real training runs.

The training runs go through the real `titans-pretrain train` (one process, two processes, and the
DeepSpeed engine), so the converter is tested on checkpoints exactly as the trainer writes them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hf_helpers import train


@pytest.fixture(scope="session", autouse=True)
def hf_home(tmp_path_factory):
    """Remote code is copied into $HF_HOME/modules: keep it out of the user's cache, offline."""
    home = tmp_path_factory.mktemp("hf_home")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_MODULES_CACHE")}
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(home / "modules"))
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "debug"


@pytest.fixture(scope="session")
def run_1proc(tmp_path_factory, data_dir) -> Path:
    return train(tmp_path_factory.mktemp("run1") / "run", data_dir)


@pytest.fixture(scope="session")
def run_2proc(tmp_path_factory, data_dir, run_1proc) -> Path:  # after run_1proc: the data then exists
    return train(tmp_path_factory.mktemp("run2") / "run", data_dir, "--nproc", "2")


@pytest.fixture(scope="session")
def run_deepspeed(tmp_path_factory, data_dir, run_1proc) -> Path:
    return train(tmp_path_factory.mktemp("run_ds") / "run", data_dir, "parallel.engine=deepspeed",
                 "parallel.zero_stage=2", "--nproc", "1")
