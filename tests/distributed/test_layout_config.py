"""Tensor/pipeline-parallel layouts that cannot work fail at config time, naming the key and the
fix; the pipeline's stage split balances its cost estimate and honours a hand-given split."""
from __future__ import annotations

from pathlib import Path

import pytest

from titans_pretrain.config import ConfigError, load_config, resolve_layout
from titans_pretrain.distributed.pipeline import balanced_split, layer_costs, stage_layer_ranges

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"  # 2 heads, 2 layers, vocab 512


@pytest.mark.parametrize("override, words", [
    (["parallel.tp=4"], ["model.n_heads", "parallel.tp"]),
    (["parallel.tp=2", "model.vocab_size=511", "data.vocab_size=511"], ["model.vocab_size", "parallel.tp"]),
    (["parallel.tp=2", "data.seq_len=31", "train.global_batch_tokens=248"], ["data.seq_len", "parallel.tp"]),
    (["parallel.tp=2", "model.mlp_hidden=63"], ["mlp_hidden", "parallel.tp"]),
    (["parallel.tp=2", "model.tie_embeddings=true"], ["tie_embeddings"]),
    (["parallel.tp=2", "parallel.data_parallel=ddp"], ["parallel.tp", "fsdp"]),
    (["parallel.pp=2", "parallel.engine=deepspeed"], ["parallel.pp", "parallel.engine=native"]),
    (["parallel.pp=4"], ["model.n_layers", "stages"]),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], ["pp_stages_per_rank", ">= 2"]),
    (["parallel.pp=2", "parallel.pp_stages_per_rank=2"], ["interleaved_1f1b"]),
    (["parallel.pp=2", "parallel.pp_layers=[2,1]"], ["parallel.pp_layers", "model.n_layers"]),
    (["parallel.pp=2", "parallel.pp_layers=[2]"], ["parallel.pp_layers", "one count"]),
])
def test_impossible_tp_pp_layouts_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(DEBUG, override)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_pipeline_needs_enough_micro_batches():
    cfg = load_config(DEBUG, ["parallel.pp=2", "train.micro_batch_size=4"])  # 8 seqs: 2 micro-batches
    assert resolve_layout(cfg, 2).grad_accum == 2
    with pytest.raises(ConfigError, match="micro-batch"):
        resolve_layout(load_config(DEBUG, ["parallel.pp=2", "train.micro_batch_size=8"]), 2)
    inter = ["model.n_layers=6", "parallel.pp=3", "parallel.pp_schedule=interleaved_1f1b",
             "parallel.pp_stages_per_rank=2", "train.micro_batch_size=2"]  # 4 micro-batches over 3 ranks
    with pytest.raises(ConfigError, match="multiple of parallel.pp"):
        resolve_layout(load_config(DEBUG, inter), 3)
    ok = resolve_layout(load_config(DEBUG, ["parallel.tp=2", "parallel.pp=2"]), 8)
    assert (ok.dp_shard, ok.tp, ok.pp, ok.grad_accum) == (2, 2, 2, 2)


def test_balanced_split_minimises_the_costliest_stage():
    assert balanced_split(2, 2, 1.0) == [1, 1]
    assert balanced_split(8, 2, 1.0) == [4, 4]
    assert balanced_split(8, 4, 1.0, last_extra=3.0) == [2, 2, 3, 1]  # the head weighs 3 blocks
    assert balanced_split(24, 4, 1.0, last_extra=2.5) == [6, 7, 7, 4]
    for n, s in [(7, 3), (13, 5), (5, 5)]:  # against brute force over every split
        import itertools
        best = min(max(c + (2.0 if i == s - 1 else 0.0) for i, c in enumerate(split))
                   for split in itertools.product(range(1, n + 1), repeat=s) if sum(split) == n)
        got = balanced_split(n, s, 1.0, last_extra=2.0)
        assert sum(got) == n and min(got) >= 1
        assert max(c + (2.0 if i == s - 1 else 0.0) for i, c in enumerate(got)) == best
    with pytest.raises(ValueError, match="at least one"):
        balanced_split(2, 3, 1.0)
    assert [list(r) for r in stage_layer_ranges([1, 2])] == [[0], [1, 2]]


def test_layer_cost_estimate_counts_the_head_on_the_last_stage():
    from titans_pretrain.models import TitansLM

    cfg = load_config(DEBUG)
    model = TitansLM(cfg.model)
    embed, block, head = layer_costs(model, cfg.data.seq_len)
    assert embed == 0.0 and block > 0
    assert head == 6.0 * cfg.model.d_model * cfg.model.vocab_size
