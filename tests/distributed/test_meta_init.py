"""A meta-device start (the trainer's default, `parallel.meta_init`) gives every layout the weights
of an eager start with the same seed, bit for bit, each rank allocating only its shards."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layout_workers import meta_init_cases, start_memory
from trainer_spawn import spawn_ranks

ROOT = Path(__file__).resolve().parents[2]


def _check(ranks: list[dict], cases: dict) -> None:
    for name in cases:
        held: set[str] = set()
        for r in ranks:
            res = r[name]
            for k, w in res["meta"].items():
                assert torch.equal(w, res["eager"][k]), f"{name}: {k} differs from the eager start"
            held |= res["meta"].keys()
            assert torch.equal(*res["rng_after"]), f"{name}: the generator is not where an eager start leaves it"
        assert held == set(ranks[0][name]["eager"]), f"{name}: parameters held by no rank"


def test_meta_start_equals_eager_start_on_two_ranks():
    cases = {
        "fsdp-mac": ["model.variant=mac"],
        "fsdp-tied-lmm": ["model.variant=lmm", "model.tie_embeddings=true"],
        "ddp-mag": ["model.variant=mag", "parallel.data_parallel=ddp"],
        "tp-mal+ac": ["model.variant=mal", "parallel.tp=2", "parallel.activation_checkpointing=true"],
        "pp-mac": ["model.variant=mac", "parallel.pp=2"],
    }
    _check(spawn_ranks(meta_init_cases, 2, cases), cases)


def test_meta_start_one_process():
    cases = {"mag": ["model.variant=mag"]}
    _check(spawn_ranks(meta_init_cases, 1, cases), cases)


@pytest.mark.slow
def test_the_1_3b_preset_starts_on_two_cpu_ranks_holding_half_each(monkeypatch):
    """configs/mac_1.3b.yaml (1.31B parameters, 5.25 GB in fp32) on 2 ranks: each allocates its
    half and never the whole model (measured: 3.36 GB peak per rank, 0.30 GB of it before the build;
    an eager start holds the full 5.25 GB on every rank before sharding)."""
    from titans_pretrain.config import load_config
    from titans_pretrain.models import TitansLM

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # freed scratch tensors leave the RSS at once
    config = str(ROOT / "configs" / "mac_1.3b.yaml")
    with torch.device("meta"):
        full = TitansLM(load_config(config).model, init=False).num_params() * 4
    ranks = spawn_ranks(start_memory, 2, config, ["train.micro_batch_size=1", "train.global_batch_tokens=8192"],
                        True, timeout=1200)
    for r in ranks:
        assert abs(r["local_param_bytes"] - full / 2) < 0.01 * full, (r, full)
        assert r["peak_rss"] - r["before"] < 0.65 * full, (r, full)
