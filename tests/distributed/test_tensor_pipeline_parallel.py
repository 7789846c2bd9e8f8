"""Tensor (+ sequence) and pipeline parallel layouts on real gloo ranks vs one plain process.

Each layout computes the gradients of the mean loss over the same global batch (every parameter,
by checkpoint name) and then takes two AdamW steps: losses, global gradient norms, gradients and
weights must match `plain_reference` (single-device PyTorch, no mesh, no engine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layout_workers import ADAM, check_layout, layout_cases, load_full_state, references
from trainer_spawn import spawn_ranks

ROOT = Path(__file__).resolve().parents[2]


def _cases(cases: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: [*ADAM, *ov] for name, ov in cases.items()}


def test_tensor_parallel_every_variant_matches_single_device():
    """tp=2: heads, per-head M_0/conv/norm, vocab-parallel embedding and loss, sequence parallel."""
    cases = {
        "mac+ac": ["model.variant=mac", "parallel.tp=2", "parallel.activation_checkpointing=true"],
        "mag": ["model.variant=mag", "parallel.tp=2"],
        "mal": ["model.variant=mal", "parallel.tp=2"],
        "lmm": ["model.variant=lmm", "parallel.tp=2"],
    }
    cases = _cases(cases)
    ranks = spawn_ranks(layout_cases, 2, cases)
    check_layout(ranks, cases, references(cases))
    # each rank holds only its heads: M_0 (H, D, E), conv (H*D, 1, K), per-head norm (H, 1, D)
    shapes = ranks[1]["mac+ac"]["local_shapes"]
    assert shapes["blocks.0.memory.initial_weights.0"] == (1, 16, 32)
    assert shapes["blocks.0.memory.q_conv.weight"] == (16, 1, 4)
    assert shapes["blocks.0.memory.out_norm.weight"] == (1, 1, 16)
    assert shapes["embed.weight"] == (256, 32)  # vocabulary-parallel


def test_pipeline_schedules_match_single_device():
    """pp=2 on 2 ranks: 1F1B, GPipe, and interleaved 1F1B with 2 virtual stages per rank."""
    cases = {
        "1f1b-mac": ["model.variant=mac", "parallel.pp=2"],
        "gpipe-lmm": ["model.variant=lmm", "parallel.pp=2", "parallel.pp_schedule=gpipe"],
        "interleaved-mal": ["model.variant=mal", "model.n_layers=4", "parallel.pp=2",
                            "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"],
    }
    cases = _cases(cases)
    ranks = spawn_ranks(layout_cases, 2, cases)
    check_layout(ranks, cases, references(cases))
    assert "embed.weight" in ranks[0]["1f1b-mac"]["grads"] and "lm_head.weight" in ranks[1]["1f1b-mac"]["grads"]


def test_four_rank_layouts_match_single_device_and_reshard(tmp_path):
    """DP x TP (FSDP2 over dp_shard=2, tp=2; HSDP dp_replicate=2 x tp=2) and TP x PP (tp=2, pp=2,
    interleaved). The TP x PP
    model and optimizer state, saved by 4 ranks, loads exactly onto 1 process (tp=1, pp=1)."""
    cases = {
        "dp2xtp2": ["model.variant=mac", "parallel.tp=2"],
        "hsdp2xtp2": ["model.variant=lmm", "parallel.tp=2", "parallel.dp_replicate=2"],
        "tp2xpp2": ["model.variant=mag", "model.n_layers=4", "parallel.tp=2", "parallel.pp=2",
                    "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"],
    }
    cases = _cases(cases)
    folder = str(tmp_path / "tp2xpp2")
    ranks = spawn_ranks(layout_cases, 4, cases, 2, {"tp2xpp2": folder})
    check_layout(ranks, cases, references(cases))

    saved: dict = {}
    for r in ranks:  # each pipeline rank holds its stages' part of the full state
        saved.update({k: v for k, v in r["tp2xpp2"]["state"].items() if k != "lr"})
    one = spawn_ranks(load_full_state, 1, [*ADAM, "model.variant=mag", "model.n_layers=4"], folder)[0]
    assert any(k.endswith("exp_avg_sq") for k in saved)
    assert saved.keys() == {k for k in one if k != "lr"}
    for k in saved:
        assert torch.equal(saved[k], one[k]), k


@pytest.mark.slow
def test_dp_pp_tp_eight_ranks_matches_single_device():
    cases = {"dp2xpp2xtp2+ac": ["model.variant=mac", "parallel.tp=2", "parallel.pp=2",
                                "parallel.activation_checkpointing=true"]}
    cases = _cases(cases)
    ranks = spawn_ranks(layout_cases, 8, cases)
    check_layout(ranks, cases, references(cases))


# ------------------------------------------------------------------------------ checkpoints
def _train(run_dir: Path, data: Path, *overrides: str, nproc: int = 1) -> list[dict]:
    cmd = [sys.executable, "-m", "titans_pretrain", "train", str(ROOT / "configs/debug.yaml"), f"run_dir={run_dir}",
           f"data.path={data}", "train.steps=6", "checkpoint.interval=3", "train.sample_tokens=0", *ADAM, *overrides]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_resumes_across_layouts_and_converts(tmp_path):
    """The real trainer: run A trains 3 steps on 1 process, then resumes from that checkpoint at
    tp=2 x pp=2 (4 ranks) to step 6; run B trains 6 steps on 1 process. Same losses at every step,
    same validation loss (pipeline evaluation vs plain); A's final checkpoint (written at tp2 x pp2)
    loads in one process and converts to Hugging Face with B's weights."""
    data, a, b = tmp_path / "data", tmp_path / "a", tmp_path / "b"
    mb = _train(b, data)
    _train(a, data, "train.stop_at=3")
    ma = _train(a, data, "parallel.tp=2", "parallel.pp=2", nproc=4)
    loss_a = {m["step"]: m["loss"] for m in ma if "loss" in m}
    loss_b = {m["step"]: m["loss"] for m in mb if "loss" in m}
    assert sorted(loss_a) == list(range(1, 7))
    assert [loss_a[s] for s in range(1, 7)] == pytest.approx([loss_b[s] for s in range(1, 7)], rel=1e-5)
    val_a = [m["val_loss"] for m in ma if "val_loss" in m]
    val_b = [m["val_loss"] for m in mb if "val_loss" in m]
    assert val_a and val_a == pytest.approx(val_b, rel=1e-5)
    assert json.loads((a / "checkpoints/step_00000006/trainer.json").read_text())["layout"]["pp"] == 2

    from titans_pretrain import load_checkpoint
    from titans_pretrain.hf.export import convert_checkpoint

    sa, sb = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=2e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    out = convert_checkpoint(a, tmp_path / "hf", with_tokenizer=False)
    assert (out / "config.json").is_file()
    from safetensors.torch import load_file

    exported = {k.removeprefix("model."): v for k, v in load_file(str(out / "model.safetensors")).items()}
    assert exported.keys() == sa.keys()
    for k, v in exported.items():
        assert torch.equal(v, sa[k]), k
