"""FSDP2 / DDP with 2 gloo ranks (and FSDP2 on 1 rank) vs plain single-device PyTorch on the same
global batch: same losses, gradients, gradient norms and weights after a few AdamW steps."""
import pytest
import torch

from trainer_spawn import spawn_ranks
from trainer_workers import check_against_reference, engine_cases, plain_reference


def test_data_parallel_matches_single_device():
    ref = plain_reference([])
    assert ref["losses"][-1] < ref["losses"][0]  # it trains (the same batch every step)
    cases = {"fsdp": ["parallel.data_parallel=fsdp"], "ddp": ["parallel.data_parallel=ddp"],
             "fsdp+ac": ["parallel.activation_checkpointing=true"]}
    ranks = spawn_ranks(engine_cases, 2, cases)  # micro batch 2: each rank accumulates 2 micro-batches
    for name in cases:
        for r in ranks:
            check_against_reference(r[name], ref)
        assert ranks[0][name]["losses"] == ranks[1][name]["losses"]  # every rank logs the global loss
    one = spawn_ranks(engine_cases, 1, {"fsdp": []})[0]["fsdp"]  # 1 rank, 4 micro-batches
    check_against_reference(one, ref)


def test_checkpoint_reshards_onto_another_dp_size(tmp_path):
    """Model and optimizer saved by 2 FSDP2 ranks load exactly onto 1 rank (and DDP onto FSDP2)."""
    from trainer_workers import load_state, save_after_steps

    saved = spawn_ranks(save_after_steps, 2, [], str(tmp_path / "ckpt"))[0]
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in saved)
    loaded = spawn_ranks(load_state, 1, ["parallel.data_parallel=ddp"], str(tmp_path / "ckpt"))[0]
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k


@pytest.mark.slow
def test_hsdp_four_ranks_matches_single_device():
    """dp_replicate=2 x dp_shard=2: FSDP2 on a 2-D mesh (replicate across, shard within)."""
    ref = plain_reference([])
    ranks = spawn_ranks(engine_cases, 4, {"hsdp": ["parallel.dp_replicate=2"]})
    for r in ranks:
        check_against_reference(r["hsdp"], ref)
