"""The memory monitors: per-layer statistics equal what the layers computed, and the non-finite
diagnosis names the first layer and token that went bad (one process; the distributed reductions run
in the trainer's multi-process tests)."""
from __future__ import annotations

import pytest
import torch

from titans_pretrain.models import TitansConfig, TitansLM
from titans_pretrain.train.memory_monitor import MemoryMonitors, memory_layers


def _model(variant="lmm", **kw):
    torch.manual_seed(0)
    cfg = TitansConfig(variant=variant, vocab_size=64, d_model=32, n_layers=3, n_heads=2, chunk_size=8,
                       segment_len=16, window=16, **kw)
    return TitansLM(cfg).double()


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_metrics_are_the_layers_own_numbers(variant):
    model = _model(variant)
    ids = torch.randint(0, 64, (2, 48))
    inputs, states = {}, {}

    def record(i):
        def hook(module, args, out):
            inputs.setdefault(i, []).append(args[0])
            states.setdefault(i, []).append(out[1])
        return hook

    hooks = [layer.register_forward_hook(record(i)) for i, layer in memory_layers(model).items()]
    monitors = MemoryMonitors(model, 3, torch.device("cpu"))
    with monitors.attached():
        model(ids)
    for h in hooks:
        h.remove()
    got = monitors.metrics()
    assert memory_layers(model).keys() == {0, 1, 2} and len(got) == 6
    for i, layer in memory_layers(model).items():
        calls = 3 if variant == "mac" else 1  # MAC writes its memory once per segment
        assert len(states[i]) == calls
        norm = max(w.norm(dim=(-2, -1)).max().item() for s in states[i] for w in s.memory.weights)
        theta = torch.cat([layer.gates(x)[0].flatten() for x in inputs[i]]).mean().item()
        assert got[f"memory_weight_norm_max/{i}"] == pytest.approx(norm, rel=1e-6)
        assert got[f"memory_theta_mean/{i}"] == pytest.approx(theta, rel=1e-6)
    assert all(layer.monitor is None for layer in memory_layers(model).values())  # detached after


def test_a_diverging_memory_is_named_with_its_first_token():
    model = _model("mag", theta_max=50.0, surprise_clip=0.0)  # an inner step that overshoots at once
    ids = torch.randint(0, 64, (2, 64))
    monitors = MemoryMonitors(model, 3, torch.device("cpu"))
    with torch.no_grad(), monitors.attached(locate=True):
        model(ids)
    report = monitors.nonfinite_report()
    assert "the memory of block 0 went non-finite first, at token" in report
    token = int(report.split("at token ")[1].split(" ")[0])
    # the same token, found directly: block 0's memory read on its input
    block = model.blocks[0]
    x = block.norm(model.embed(ids))
    q, k, v, _ = block.memory.qkv(x)
    from titans_pretrain.models.memory_ops import memory_chunked

    y, _ = memory_chunked(q, k, v, *block.memory.gates(x), block.memory.initial_state(2).memory,
                          chunk_size=8, surprise_clip=0.0)
    bad = (~torch.isfinite(y).all(-1)).flatten(0, 1).any(0)
    assert 0 < token < 64 and bad[token] and not bad[:token].any()
    with torch.no_grad(), monitors.attached(locate=True):
        _model("mag", theta_max=50.0)(ids)  # the same model with the default clip: nothing to report
    assert not any(m.first_bad_read is not None for m in monitors.monitors.values())


def test_a_bad_input_is_not_blamed_on_the_memory():
    model = _model("lmm")
    ids = torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        model.embed.weight[ids[0, 20]] = float("nan")
    first = int((ids[0] == ids[0, 20]).nonzero()[0])
    monitors = MemoryMonitors(model, 3, torch.device("cpu"))
    with torch.no_grad(), monitors.attached(locate=True):
        model(ids)
    assert f"the input of block 0's memory was already non-finite at token {first}" in monitors.nonfinite_report()
    healthy = _model("lmm")
    monitors = MemoryMonitors(healthy, 3, torch.device("cpu"))
    with torch.no_grad(), monitors.attached(locate=True):
        healthy(ids)
    assert "every memory read was finite" in monitors.nonfinite_report()  # then the backward overflowed
