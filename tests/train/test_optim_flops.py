"""Parameter groups, schedules and the FLOPs/MFU accounting."""

import pytest
import torch

from titans_pretrain.config import OptimConfig
from titans_pretrain.models import TitansConfig, TitansLM
from titans_pretrain.models.flops import (attention_context, flops_per_token, matmul_params,
                                         memory_forward_flops, mfu)
from titans_pretrain.train.optim import build_optimizer, lr_factor, param_groups


def tiny(**kw):
    base = dict(variant="mac", vocab_size=64, d_model=16, n_layers=2, n_heads=2, chunk_size=4,
                segment_len=8, window=8, n_persistent=2, memory_expansion=2)
    base.update(kw)
    return TitansConfig(**base)


def test_no_decay_groups_cover_norms_biases_embeddings_once():
    model = TitansLM(tiny())
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert "embed.weight" in no_decay and "norm.weight" in no_decay
    assert "lm_head.weight" in decay
    assert not decay & no_decay and decay | no_decay == set(names.values())
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1
    only_bias = param_groups(model, OptimConfig(no_decay=["bias"]))
    assert "embed.weight" in {names[id(p)] for p in only_bias[0]["params"]}
    with pytest.raises(ValueError, match="no_decay"):
        param_groups(model, OptimConfig(no_decay=["weights"]))
    assert isinstance(build_optimizer(model, OptimConfig()), torch.optim.AdamW)


def test_schedules():
    cos = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cos) == pytest.approx(0.1)
    assert lr_factor(9, 100, cos) == pytest.approx(1.0)
    assert lr_factor(10, 100, cos) == pytest.approx(1.0)
    assert lr_factor(55, 100, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, cos) == pytest.approx(0.1)
    values = [lr_factor(s, 100, cos) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    wsd = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, 100, wsd) == 1.0 and lr_factor(79, 100, wsd) == 1.0
    assert lr_factor(89, 100, wsd) == pytest.approx(0.5)
    assert lr_factor(99, 100, wsd) == pytest.approx(0.0)
    assert lr_factor(50, 100, OptimConfig(schedule="constant", warmup_steps=0)) == 1.0


def test_flops_formula_terms():
    cfg = tiny()
    model = TitansLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(model) == linear
    d, e, b, H = 8, 16, 4, 2
    # layer D->E: key 2de, read 4de + 2b(d+e), update 4de (no inner backward below the first layer);
    # layer E->D: key 2ed, inner backward 2ed, read 4ed + 2b(e+d), update 4ed; coefficients 2b^2 + 2b
    assert memory_forward_flops(cfg) == H * (10 * d * e + 12 * e * d + 4 * b * (d + e) + 2 * b * b + 2 * b)
    T = 32
    assert attention_context(cfg, T) == 2 + 9  # persistent + (C+1)
    context_read = 3 * 2 * 16 * (H * d) + H * (2 * d * e + 2 * e * d)  # MAC: q/gate/out proj + MLP read
    expected = 6 * linear + 3 * 2 * (4 * 2 * 8 * 11 + memory_forward_flops(cfg) + context_read)
    assert flops_per_token(model, cfg, T) == pytest.approx(expected)
    # the attention context of a sliding window: mean over t of min(t + 1, w)
    mag = tiny(variant="mag")
    assert attention_context(mag, 32) == pytest.approx(2 + sum(min(t + 1, 8) for t in range(32)) / 32)
    lmm = tiny(variant="lmm")
    assert attention_context(lmm, 32) == 0
    # a deeper memory and a bigger chunk cost more
    assert memory_forward_flops(tiny(memory_depth=3)) > memory_forward_flops(cfg)
    assert memory_forward_flops(tiny(chunk_size=8)) > memory_forward_flops(cfg)


def test_mfu():
    assert mfu(1e9, 1000.0, 2, None) is None
    assert mfu(1e9, 1000.0, 2, 1e12) == pytest.approx(0.5)
