"""Titans layers in Megatron-core: the same numbers as the native model, at TP=1 and TP=2, through
Megatron's ``dist_checkpointing`` (saved at one TP size, loaded at another), and the converter.

megatron-core is a CI dependency (``[dev]`` pulls ``[megatron]``): these tests fail, not skip, when
it is missing. Megatron's CUDA-only internals are patched for CPU by ``megatron_cpu_compat`` inside
the worker processes only.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from megatron_cpu_compat import MegatronCompatError, check_megatron_version  # noqa: E402
from trainer_spawn import spawn_ranks  # noqa: E402

from titans_pretrain.models import TitansConfig, TitansLM  # noqa: E402

VARIANTS = ("lmm", "mal", "mag", "mac")


def tiny(variant: str, **kw) -> TitansConfig:
    """Small enough for seconds on CPU; several chunks, windows and segments per sequence. (With
    ``theta_max=0.3`` MAC's loss rises under these step sizes and fp32 rounding differences between
    TP sizes grow to 1e-3 in three steps; at 0.03 every variant trains smoothly.)"""
    base = dict(variant=variant, vocab_size=512, d_model=32, n_layers=2, n_heads=4, chunk_size=8, window=8,
                segment_len=8, n_persistent=0, theta_max=0.03)
    base.update(kw)
    return TitansConfig(**base)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------ compat fixture
def test_cpu_compat_pins_the_installed_megatron(monkeypatch):
    """The fixture runs on the pinned megatron-core, and refuses another version or a moved target."""
    import megatron.core
    import megatron.core.transformer.utils as mutils

    check_megatron_version()
    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(MegatronCompatError, match="0.99.0.*re-check every patch"):
        check_megatron_version()
    monkeypatch.undo()
    monkeypatch.delattr(mutils, "get_default_causal_mask")
    with pytest.raises(MegatronCompatError, match="get_default_causal_mask is gone"):
        check_megatron_version()


def test_extra_pins_the_patched_version():
    """pyproject's [megatron] extra pins exactly the version the CPU fixture patches."""
    from megatron_cpu_compat import PATCHED_VERSION

    from titans_pretrain.integrations.megatron import TESTED_MEGATRON_CORE

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'megatron = ["megatron-core=={PATCHED_VERSION}"]' in text
    assert TESTED_MEGATRON_CORE == PATCHED_VERSION


# ---------------------------------------------------------------------------------- converter
@pytest.mark.parametrize("variant", VARIANTS)
def test_converter_round_trip_is_exact(variant):
    from titans_pretrain.integrations.megatron_convert import megatron_to_native, native_to_megatron

    titans = tiny(variant)
    native = TitansLM(titans).state_dict()
    meg = native_to_megatron(native, titans)
    assert "output_layer.weight" in meg and "decoder.layers.1.mlp.linear_fc1.weight" in meg
    back = megatron_to_native(meg, titans)
    assert back.keys() == native.keys()
    for k, v in native.items():
        assert torch.equal(back[k], v), k


def test_converter_tied_embeddings():
    """Tied models have no Megatron output layer (GPTModel shares the embedding); back, the head is
    the embedding again."""
    from titans_pretrain.integrations.megatron_convert import megatron_to_native, native_to_megatron

    titans = tiny("mag", tie_embeddings=True)
    native = TitansLM(titans).state_dict()
    meg = native_to_megatron(native, titans)
    assert "output_layer.weight" not in meg
    back = megatron_to_native(meg, titans)
    assert torch.equal(back["lm_head.weight"], native["embed.weight"])
    assert all(torch.equal(back[k], v) for k, v in native.items())


def test_converter_layouts():
    """SwiGLU as fc1 = [gate; up]; fused qkv per head [q_h; k_h; v_h] (Megatron's MHA layout)."""
    from titans_pretrain.integrations.megatron_convert import native_to_megatron

    titans = tiny("mal")
    native = TitansLM(titans).state_dict()
    meg = native_to_megatron(native, titans)
    fc1 = meg["decoder.layers.0.mlp.linear_fc1.weight"]
    hidden = titans.resolved_mlp_hidden
    assert torch.equal(fc1[:hidden], native["blocks.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[hidden:], native["blocks.0.mlp.up_proj.weight"])
    qkv = meg["decoder.layers.0.self_attention.attention.linear_qkv.weight"]
    D = titans.resolved_head_dim
    head1 = qkv[3 * D:6 * D]
    assert torch.equal(head1[:D], native["blocks.0.attn.q_proj.weight"][D:2 * D])
    assert torch.equal(head1[D:2 * D], native["blocks.0.attn.k_proj.weight"][D:2 * D])
    assert torch.equal(head1[2 * D:], native["blocks.0.attn.v_proj.weight"][D:2 * D])


def test_converter_refuses_what_megatron_cannot_express():
    from titans_pretrain.integrations.megatron_convert import native_to_megatron

    titans = tiny("mac", n_persistent=2)
    with pytest.raises(ValueError, match="n_persistent=2.*n_persistent=0"):
        native_to_megatron(TitansLM(titans).state_dict(), titans)
    titans = tiny("mag", use_memory=False)
    with pytest.raises(ValueError, match="use_memory=False"):
        native_to_megatron(TitansLM(titans).state_dict(), titans)


def test_config_mismatch_errors():
    from titans_pretrain.integrations.megatron import _check_shapes, titans_transformer_config

    titans = tiny("lmm")
    config = titans_transformer_config(titans)
    assert config.window_size is None and titans_transformer_config(tiny("mal")).window_size == (7, 0)
    with pytest.raises(ValueError, match="hidden_size=64 differs from TitansConfig.d_model=32"):
        _check_shapes(titans_transformer_config(tiny("lmm", d_model=64)), titans, 1)
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by the tensor-parallel size 3"):
        _check_shapes(config, titans, 3)
    from titans_pretrain.integrations.megatron import _check_window

    with pytest.raises(ValueError, match=r"window=8 tokens: set TransformerConfig.window_size=\(7, 0\) \(got None\)"):
        _check_window(config, tiny("mag"), "MAG")


# ------------------------------------------------------------------------- the distributed run
@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """One 2-process launch: every variant at TP=1 and TP=2 with dist_checkpointing between them."""
    cases = []
    for i, variant in enumerate(VARIANTS):
        torch.manual_seed(i)
        titans = tiny(variant)
        native = TitansLM(titans)
        ids = torch.randint(0, titans.vocab_size, (2, 21))  # 21: partial chunk, window and segment
        labels = torch.randint(0, titans.vocab_size, (2, 21))
        cases.append((variant, titans, native.state_dict(), ids, labels))
    from megatron_workers import tp_roundtrip

    workdir = tmp_path_factory.mktemp("megatron")
    results = spawn_ranks(tp_roundtrip, 2, cases, str(workdir), 3, 0.05)
    return results, workdir, {c[0]: c for c in cases}


@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_matches_native(tp_results, variant):
    """Same weights (through the converter): Megatron TP=1 logits and gradients = native (fp32)."""
    r = tp_results[0][0][variant]
    assert rel(r["tp1_logits"], r["native_logits"]) < 1e-5
    assert abs(r["tp1_losses"][0] - r["native_loss"]) < 1e-5 * r["native_loss"]
    for name, g in r["native_grads"].items():
        assert rel(r["tp1_grads_native"][name], g) < 1e-5, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_tp2_gradients_equal_tp1(tp_results, variant):
    """The first step's TP=2 gradients (saved through dist_checkpointing, reassembled at TP=1)
    equal the TP=1 gradients, parameter by parameter (fp32)."""
    r = tp_results[0][0][variant]
    assert r["tp2_grads_native"].keys() == r["tp1_grads_native"].keys()
    for name, g in r["tp1_grads_native"].items():
        assert rel(r["tp2_grads_native"][name], g) < 1e-5, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_tp2_trains_like_tp1(tp_results, variant):
    """TP=2 (loaded from a TP=1 dist checkpoint) gives the TP=1 losses step by step, on both ranks,
    and ends at the TP=1 weights: its TP=2 checkpoint, reloaded at TP=1, equals TP=1's training."""
    r0, r1 = tp_results[0][0][variant], tp_results[0][1][variant]
    for a, b, c in zip(r0["tp1_losses"], r0["tp2_losses"], r1["tp2_losses"]):
        assert abs(a - b) < 1e-5 * a and b == c
    assert r0["tp1_losses"][-1] < r0["tp1_losses"][0]  # it learns
    for name, w in r0["tp1_trained"].items():
        assert rel(r0["tp2_reloaded_at_tp1"][name], w) < 1e-5, name
    # The reloaded TP=1 model computes what the TP=2 model it was saved from computes.
    assert rel(r0["reloaded_logits"], r0["tp2_trained_logits"]) < 1e-6


def test_tp2_shards_the_memory_by_heads(tp_results):
    """Each of the 2 ranks holds 2 of the 4 heads: projections, gates, conv, M_0, norm, out_proj."""
    shapes = tp_results[0][0]["lmm"]["tp2_local_shapes"]
    p = "decoder.layers.0.self_attention."
    assert shapes[p + "q_proj.weight"] == (16, 32)
    assert shapes["embedding.word_embeddings.weight"] == (256, 32)
    assert shapes[p + "theta_proj.weight"] == (2, 32) and shapes[p + "theta_proj.bias"] == (2,)
    assert shapes[p + "q_conv.weight"] == (16, 1, 4)
    assert shapes[p + "initial_weights.0"] == (2, 8, 32) and shapes[p + "initial_weights.1"] == (2, 32, 8)
    assert shapes[p + "out_norm.weight"] == (2, 1, 8)
    assert shapes[p + "out_proj.weight"] == (32, 16)
    mac = tp_results[0][0]["mac"]["tp2_local_shapes"]
    assert mac["decoder.layers.0.self_attention.attention.linear_qkv.weight"] == (48, 32)


# ----------------------------------------------------------------------- checkpoint conversion
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_conversion_both_ways(tp_results, variant):
    """native -> Megatron checkpoint (save_megatron_checkpoint, in the workers) -> native is exact,
    and the TP=2-trained Megatron checkpoint read back in this process (plain DCP, no Megatron
    runtime) gives the TP=2 model's logits."""
    from titans_pretrain.integrations.megatron_convert import megatron_checkpoint_to_native

    results, workdir, cases = tp_results
    _, titans, native_state, ids, _ = cases[variant]
    back = megatron_checkpoint_to_native(workdir / f"{variant}_init_tp1")  # titans_config.json inside
    assert back.config == titans
    for k, v in native_state.items():
        assert torch.equal(back.state_dict()[k], v), k
    trained = megatron_checkpoint_to_native(workdir / f"{variant}_trained_tp2", titans)
    with torch.no_grad():
        logits = trained(ids).logits
    assert rel(logits, results[0][variant]["tp2_trained_logits"]) < 1e-5


def test_megatron_checkpoint_to_native_run(tp_results, tmp_path):
    """A Megatron checkpoint becomes a native run checkpoint that load_checkpoint (and train) read."""
    from titans_pretrain import load_checkpoint
    from titans_pretrain.integrations.megatron_convert import megatron_checkpoint_to_run

    results, workdir, cases = tp_results
    _, titans, _, ids, _ = cases["mal"]
    config = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"
    run = tmp_path / "run"
    folder = megatron_checkpoint_to_run(workdir / "mal_trained_tp2", run, config, titans=titans,
                                        overrides=[f"data.path={tmp_path / 'data'}"], log=lambda *_: None)
    assert (run / "checkpoints" / "latest").read_text().strip() == folder.name == "step_00000000"
    model = load_checkpoint(run)
    assert model.config == titans
    with torch.no_grad():
        assert rel(model(ids).logits, results[0]["mal"]["tp2_trained_logits"]) < 1e-5


def test_reader_errors_name_the_fix(tmp_path):
    from titans_pretrain.integrations.megatron_convert import megatron_checkpoint_to_native

    with pytest.raises(FileNotFoundError, match="no metadata.json: not a Megatron dist_checkpointing folder"):
        megatron_checkpoint_to_native(tmp_path)
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.raises(ValueError, match="only 'torch_dist'"):
        megatron_checkpoint_to_native(tmp_path)


# ------------------------------------------------------------------ Megatron's own training stack
def test_megatron_ddp_distributed_optimizer_tp1_equals_tp2(tmp_path):
    """Megatron DDP + distributed Adam + clipping train the Titans GPT identically at TP=1 and TP=2:
    the seeded init is the same at both sizes (bit for bit), and so are losses and gradient norms
    (the norm counts the head-sharded memory tensors on every rank: they carry Megatron's
    tensor-parallel attributes)."""
    from megatron_workers import megatron_training

    from titans_pretrain.integrations.megatron_convert import read_megatron_checkpoint

    titans = tiny("mal")
    g = torch.Generator().manual_seed(1)
    ids, labels = (torch.randint(0, titans.vocab_size, (2, 21), generator=g) for _ in range(2))
    r0, r1 = spawn_ranks(megatron_training, 2, titans, ids, labels, 3, str(tmp_path))
    assert r0 == r1
    assert r0["mixer_all_reduces"] == (1, 1)  # TP=2 memory layer: out_proj forward, the input grad backward
    a, b = read_megatron_checkpoint(tmp_path / "seeded_init_tp1"), read_megatron_checkpoint(tmp_path / "seeded_init_tp2")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for (l1, n1), (l2, n2) in zip(r0[1], r0[2]):
        assert abs(l1 - l2) < 1e-5 * l1 and abs(n1 - n2) < 1e-5 * n1
    assert r0[1][0][1] > 1.0  # clipping is active
    assert r0[1][-1][0] < r0[1][0][0] - 0.1  # it learns


SAVE_SCRIPT = """
import json, sys, torch
from titans_pretrain.models import TitansConfig, TitansLM
from titans_pretrain.integrations.megatron_convert import megatron_process, save_megatron_checkpoint
if __name__ == "__main__":
    titans = TitansConfig(**json.loads(sys.argv[1]))
    with megatron_process():
        save_megatron_checkpoint(torch.load(sys.argv[2]), titans, sys.argv[3])
"""


def test_save_megatron_checkpoint_in_a_plain_cpu_process(tmp_path):
    """The documented user path, without the test compat patches: a plain script on a CPU-only
    machine writes a Megatron checkpoint that reads back to the same weights."""
    import dataclasses
    import json
    import os
    import subprocess

    from titans_pretrain.integrations.megatron_convert import megatron_checkpoint_to_native

    titans = tiny("mag")
    native = TitansLM(titans).state_dict()
    torch.save(native, tmp_path / "native.pt")
    (tmp_path / "save.py").write_text(SAVE_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "save.py"), json.dumps(dataclasses.asdict(titans)),
                           str(tmp_path / "native.pt"), str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    back = megatron_checkpoint_to_native(tmp_path / "ckpt").state_dict()
    for k, v in native.items():
        assert torch.equal(back[k], v), k


def test_pipeline_parallel_stages_equal_one_stage(tmp_path):
    """Titans layers split over 2 pipeline stages by Megatron's schedule (2 microbatches) give the
    one-stage losses and, parameter by parameter, the one-stage gradients (fp32, 1e-5)."""
    from megatron_workers import pipeline_parallel

    from titans_pretrain.integrations.megatron_convert import read_megatron_checkpoint

    titans = tiny("mal", n_layers=4)
    g = torch.Generator().manual_seed(2)
    ids, labels = (torch.randint(0, titans.vocab_size, (2, 21), generator=g) for _ in range(2))
    r0, r1 = spawn_ranks(pipeline_parallel, 2, titans, ids, labels, str(tmp_path))
    assert r1[2] is not None and r0[2] is None  # the loss lives on the last stage
    assert r0[1] == r1[1] and max(abs(a - b) for a, b in zip(r1[1], r1[2])) < 1e-5 * r1[1][0]
    one, two = read_megatron_checkpoint(tmp_path / "grads_pp1"), read_megatron_checkpoint(tmp_path / "grads_pp2")
    assert one.keys() == two.keys() and "decoder.layers.3.self_attention.memory.initial_weights.0" in two
    for k in one:
        assert rel(two[k], one[k]) < 1e-5, k
