"""Context parallelism (the memory state relayed across sequence slices) vs one process on the
same batch: same loss and same gradient of every parameter, for every variant."""
import re
import sys
from pathlib import Path

import pytest
import torch

from cp_workers import model_cases
from trainer_spawn import spawn_ranks


def _cases() -> dict:
    cases = {}
    for variant in ("mac", "mag", "mal", "lmm"):
        for cp in (2, 4):
            cases[f"{variant}-cp{cp}"] = {"model": {"variant": variant}, "cp_size": cp}
    # attention-only ablations (MAG: only the KV halo moves), pieces along the batch, recompute
    cases["mag-nomem-cp4"] = {"model": {"variant": "mag", "use_memory": False}, "cp_size": 4}
    cases["mac-m2-cp2"] = {"model": {"variant": "mac"}, "cp_size": 2, "microbatches": 2}
    cases["mal-ac-cp4"] = {"model": {"variant": "mal", "window": 20}, "cp_size": 4, "ac": True}
    cases["lmm-pcg-cp4"] = {"model": {"variant": "lmm", "per_chunk_gates": True}, "cp_size": 4}
    return cases


def test_cp_matches_one_process_fp64_every_variant():
    cases = _cases()
    ranks = spawn_ranks(model_cases, 4, {k: dict(v, model=dict(v["model"])) for k, v in cases.items()})
    for name in cases:
        for r, res in enumerate(ranks):
            got = res[name]
            assert got["losses"][0] == pytest.approx(got["ref_loss"], rel=1e-12), (name, r)
            assert got["losses"][1] == got["losses"][0], (name, r)
            assert got["max_rel_grad_err"] < 1e-10, (name, r, got["max_rel_grad_err"])
    # what crosses a boundary is the block's state, independent of the slice length: for MAC
    # (fp64, B=4, H=2, D=8, E=16, depth 2, conv kernel 3) weights + momentum of both memory layers
    # and the 2-token conv tails of 4 streams (q, k, v and the pre-segment read's q)
    state = 4 * 2 * (2 * (8 * 16 + 16 * 8)) * 8 + 4 * 4 * 2 * 16 * 8
    for name in ("mac-cp2", "mac-cp4", "mac-m2-cp2"):
        assert ranks[0][name]["boundary_bytes"] == {0: state, 1: state}, name
    assert ranks[-1]["mac-cp4"]["boundary_bytes"] == {}  # the last slice hands nothing on


def test_cp_layouts_match_single_device_and_checkpoint_loads_at_cp1(tmp_path):
    """The trainer's engine on 4 processes vs plain single-device PyTorch (gradients of every
    parameter, then 2 AdamW steps): dp=2 x cp=2 (MAC, FSDP2; and DDP with 2 pieces per hand-off),
    cp=4 (MAG, a window spanning slices), cp=2 x tp=2 (each tp shard relays its heads' state) and
    pp=2 x cp=2 (1F1B: several micro-batches in flight through each stage's relay); then a
    dp=2 x cp=2 checkpoint loads exactly on 1 process."""
    from layout_workers import ADAM, check_layout, layout_cases, references
    from trainer_workers import load_state, save_after_steps

    cases = {"dp2xcp2": ["parallel.cp=2"],
             "dp2xcp2-ddp-m2": ["parallel.cp=2", "parallel.data_parallel=ddp", "parallel.cp_microbatches=2"],
             "cp4-mag": ["parallel.cp=4", "model.variant=mag", "model.window=12"],
             "cp2xtp2": ["parallel.cp=2", "parallel.tp=2"],
             "pp2xcp2": ["parallel.cp=2", "parallel.pp=2"]}
    cases = {name: [*ADAM, *ov] for name, ov in cases.items()}
    ranks = spawn_ranks(layout_cases, 4, cases)
    check_layout(ranks, cases, references(cases))

    saved = spawn_ranks(save_after_steps, 4, ["parallel.cp=2"], str(tmp_path / "ckpt"))[0]
    loaded = spawn_ranks(load_state, 1, [], str(tmp_path / "ckpt"))[0]
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k


@pytest.mark.parametrize("overrides, message", [
    (["parallel.cp=3"], "data.seq_len=32 is not divisible by parallel.cp=3"),
    (["parallel.cp=4"], "would split a MAC segment (model.segment_len) of 16 tokens"),
    (["parallel.cp=4", "model.variant=lmm", "model.chunk_size=16"], "memory chunk (model.chunk_size)"),
    (["parallel.cp=2", "parallel.engine=deepspeed"], "needs parallel.engine=native"),
    (["parallel.cp=2", "parallel.cp_microbatches=3"], "must divide train.micro_batch_size"),
    (["parallel.cp=2", "parallel.pp=2", "parallel.cp_microbatches=2"], "already fill the cp wavefront"),
])
def test_bad_cp_layouts_are_refused_with_the_fix(overrides, message):
    from titans_pretrain.config import ConfigError, load_config
    from trainer_workers import CONFIG

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIG, overrides)


def test_trainer_cp2_checkpoint_resumes_at_cp1(tmp_path):
    """`train --nproc 2 parallel.cp=2` stops at step 4; the run resumes on 1 process (cp=1) and
    ends where an uninterrupted 1-process run ends (fp32: summation order differs, 1e-5)."""
    from titans_pretrain.data.prepare import prepare_dataset

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from run_helpers import final_weights, losses, metrics, train

    data = tmp_path / "data"
    prepare_dataset(None, data, vocab_size=512, seq_len=32, default_corpus_bytes=1 << 20, progress=False)
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(ref, data)
    out = train(run, data, "parallel.cp=2", "train.stop_at=4", nproc=2).stdout
    assert "cp=2" in out and "cp idle" in out
    assert all(0 <= m["cp_idle"] < 1 for m in metrics(run) if "loss" in m)  # the wavefront's waits, logged
    out = train(run, data).stdout
    assert "resumed from" in out and "step 4" in out
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-5)
    wa, wb = final_weights(run), final_weights(ref)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
