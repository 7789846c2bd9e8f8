"""Shared fixtures for the Hugging Face export tests: an isolated HF cache and real training runs.

The training runs go through the real `titans-pretrain train` (one process, two processes, and the
DeepSpeed engine), so the converter is tested on checkpoints exactly as the trainer writes them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from hf_helpers import train


@pytest.fixture(scope="session", autouse=True)
def hf_home(offline_hf):
    """Every test here runs with the offline scratch Hugging Face cache."""
    return offline_hf


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
