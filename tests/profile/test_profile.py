"""The FLOPs split against torch's FLOP counter, and the report of a real `profile` run."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from titans_pretrain.models import TitansConfig, TitansLM
from titans_pretrain.models.memory_ops import init_state, memory_chunked
from titans_pretrain.profile.flops_split import flops_split
from titans_pretrain.models.flops import memory_dims, memory_forward_flops


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_dense_part_matches_counted_linear_flops():
    """6 * N_matmul: the counter's FLOPs of every nn.Linear call in a forward, x3 for training."""
    cfg = TitansConfig(variant="mag", vocab_size=64, d_model=16, n_layers=2, n_heads=2, chunk_size=4,
                       window=8, n_persistent=0, memory_expansion=2)
    model, B, T = TitansLM(cfg), 2, 32
    linear_flops = 0

    def hook(mod, inp, out):
        nonlocal linear_flops
        linear_flops += 2 * inp[0].shape[:-1].numel() * mod.in_features * mod.out_features

    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(hook)
    model(torch.randint(0, 64, (B, T)))
    split = flops_split(model, cfg, T)
    assert 3 * linear_flops / (B * T) == pytest.approx(split["dense"])


def test_attention_context_is_the_mean_number_of_visible_keys():
    """The formula's useful attention work: `ctx` equals the mean count of True entries per query
    row of the masks the model really uses (masked-out scores are not counted)."""
    from titans_pretrain.models.attention import mac_segment_mask, sliding_window_mask
    from titans_pretrain.models.flops import attention_context

    T, w, C, n_p = 32, 8, 8, 2
    mag = TitansConfig(variant="mag", vocab_size=64, d_model=16, n_heads=2, window=w, n_persistent=n_p)
    pos = torch.arange(T)
    visible = sliding_window_mask(pos, pos, w).sum().item() / T
    assert attention_context(mag, T) == pytest.approx(n_p + visible)
    mac = TitansConfig(variant="mac", vocab_size=64, d_model=16, n_heads=2, segment_len=C, n_persistent=n_p)
    mask = mac_segment_mask(C, C)
    assert attention_context(mac, T) == pytest.approx(n_p + mask.sum().item() / C)


def _baddbmm_inplace_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    bsz, m, k = a_shape
    return 2 * bsz * m * k * b_shape[-1]


@pytest.mark.parametrize("depth,chunk", [(1, 4), (2, 4), (2, 8), (3, 4)])
def test_memory_part_equals_counted_memory_chunked(depth, chunk):
    """The memory terms are exactly the matmul FLOPs `memory_chunked`'s forward executes (the counter
    does not know the in-place `baddbmm_`, so it is registered here)."""
    cfg = TitansConfig(variant="lmm", vocab_size=64, d_model=16, n_layers=1, n_heads=2, chunk_size=chunk,
                       memory_depth=depth, memory_expansion=2)
    B, H, T, D = 2, 2, 32, 8
    state = init_state([torch.randn(H, a, c) * 0.1 for a, c in memory_dims(cfg)], B)
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    g = torch.full((B, H, T), 0.5)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: _baddbmm_inplace_flop}) as fc:
        memory_chunked(q, k, v, g * 0.01, g, g * 0.1, state, chunk_size=chunk)
    assert fc.get_total_flops() / (B * T) == memory_forward_flops(cfg)


def test_profile_report_of_debug_config(tmp_path):
    out = tmp_path / "prof"
    proc = subprocess.run(
        [sys.executable, "-m", "titans_pretrain", "profile", "configs/debug.yaml", "--steps", "2",
         "--warmup", "1", "--profile-steps", "1", "--out", str(out), "--sweep-seq-len", "16,32,128"],
        capture_output=True, text=True, timeout=240, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timed step 2/3" in proc.stdout  # progress while it runs
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    assert [r["seq_len"] for r in rows] == [16, 32, 128]
    # fixed tokens per step across the sweep, also where one sequence outgrows a micro-batch
    assert {r["tokens_per_step"] for r in rows} == {256}
    assert rows[2]["layout"]["micro_batch_size"] == 1 and rows[2]["layout"]["grad_accum"] == 2
    for r in rows:
        assert r["timed_steps"] == 2 and len(r["step_times_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / r["world_size"])
        assert r["mfu"] is None and r["peak_flops"] is None  # CPU: peak unknown
        f = r["flops_per_token"]
        assert f["total"] == pytest.approx(f["dense"] + f["attention"] + f["memory"])
        assert min(f["dense"], f["attention"], f["memory"]) > 0
        assert r["peak_memory_bytes"] > 50 * 2**20 and r["peak_memory_kind"].startswith("rss")
        b = r["breakdown_s"]
        assert b["basis"] == "host wall time, shares scaled to the timed step"
        for comp in ("attention", "memory", "mlp", "optimizer"):
            assert b[comp] > 0, comp
        parts = sum(b[c] for c in ("attention", "memory", "mlp", "optimizer", "communication", "other"))
        assert parts == pytest.approx(b["total"], rel=1e-6)
        assert b["total"] == pytest.approx(r["step_time_s"])  # adds up to the reported ms/step
        assert b["communication"] == 0.0  # one process: nothing to communicate
        assert b["profiled_step"] > 0
        trace = json.loads(open(r["trace"]).read())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"titans::memory", "titans::attention", "titans::mlp"} <= names
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
