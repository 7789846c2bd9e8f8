"""The chunked dual form against the token-by-token reference, in fp64."""
from __future__ import annotations

import pytest
import torch

from titans_pretrain.models.memory_ops import (
    MemoryState,
    init_state,
    memory_chunked,
    memory_read,
    memory_recurrent,
    surprise_clip_scale,
    surprise_gradients,
)

RTOL = 1e-10


def _inputs(B, H, T, D, depth, expansion=2, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)

    q, k, v = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    theta = (0.2 * torch.rand(B, H, T, generator=g, dtype=dtype)).requires_grad_(requires_grad)
    eta = (0.5 + 0.5 * torch.rand(B, H, T, generator=g, dtype=dtype)).requires_grad_(requires_grad)
    alpha = (0.2 * torch.rand(B, H, T, generator=g, dtype=dtype)).requires_grad_(requires_grad)
    dims = [D] + [expansion * D] * (depth - 1) + [D]
    weights = tuple(rnd(B, H, dims[i], dims[i + 1], scale=dims[i] ** -0.5) for i in range(depth))
    momentum = tuple(rnd(B, H, dims[i], dims[i + 1], scale=0.1 * dims[i] ** -0.5) for i in range(depth))
    return (q, k, v, theta, eta, alpha), MemoryState(weights, momentum)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CASES = [
    # B, H, T, D, depth, chunk, activation
    (2, 3, 13, 4, 1, 4, "gelu"),
    (1, 2, 16, 5, 2, 4, "silu"),
    (2, 2, 11, 3, 2, 1, "gelu"),   # chunk 1: the exact per-token recurrence
    (1, 1, 9, 4, 3, 4, "gelu"),    # depth 3, chunks that do not divide T
    (2, 1, 7, 4, 2, 16, "silu"),   # one chunk longer than T
    (1, 2, 12, 4, 2, 3, "gelu"),
]


def _chunked_against_recurrent(tensors, state, depth, chunk, act, clip=0.0):
    """Outputs, final state and every input's gradient of the dual form against plain autograd
    through the token-by-token rule (fp64); returns the dual form's outputs."""
    B, H, T, D = tensors[0].shape
    leaves = list(tensors) + list(state.weights) + list(state.momentum)
    g = torch.Generator().manual_seed(1)
    probe_y = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    probes = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in state.weights + state.momentum]
    results = []
    for fn in (memory_recurrent, memory_chunked):
        y, final = fn(*tensors, state, chunk_size=chunk, activation=act, surprise_clip=clip)
        loss = (y * probe_y).sum() + sum((t * p).sum() for t, p in zip(final.weights + final.momentum, probes))
        results.append((y, final, torch.autograd.grad(loss, leaves)))
    (y_r, s_r, g_r), (y_c, s_c, g_c) = results
    assert _rel_err(y_c, y_r) < RTOL
    for a, b in zip(s_c.weights + s_c.momentum, s_r.weights + s_r.momentum):
        assert _rel_err(a, b) < RTOL
    names = ["q", "k", "v", "theta", "eta", "alpha"] + [f"W{i}" for i in range(depth)] + [f"S{i}" for i in range(depth)]
    for name, a, b in zip(names, g_c, g_r):
        assert _rel_err(a, b) < RTOL, name
    return y_c


@pytest.mark.parametrize("B,H,T,D,depth,chunk,act", CASES)
def test_chunked_matches_recurrent_forward_and_grads(B, H, T, D, depth, chunk, act):
    tensors, state = _inputs(B, H, T, D, depth, seed=T * 7 + depth, requires_grad=True)
    _chunked_against_recurrent(tensors, state, depth, chunk, act)


def _median_surprise_norm(tensors, state, act="gelu"):
    """A clip at the median surprise norm (at the initial weights) clips about half the tokens."""
    inputs, deltas = surprise_gradients(tensors[1].detach(), tensors[2].detach(),
                                        [w.detach() for w in state.weights], activation=act)
    _, r2 = surprise_clip_scale(inputs, deltas, 1.0)
    return r2.sqrt().median().item()


@pytest.mark.parametrize("B,H,T,D,depth,chunk,act", CASES)
def test_clipped_chunked_matches_recurrent_forward_and_grads(B, H, T, D, depth, chunk, act):
    """The surprise clip in the dual form (hand-written backward through the clip factor) against
    plain autograd through the token-by-token rule, with about half the tokens clipped."""
    tensors, state = _inputs(B, H, T, D, depth, seed=T * 7 + depth, requires_grad=True)
    clip = _median_surprise_norm(tensors, state, act)
    y_c = _chunked_against_recurrent(tensors, state, depth, chunk, act, clip)
    bare, _ = memory_chunked(*tensors, state, chunk_size=chunk, activation=act)
    assert _rel_err(bare, y_c) > 1e-3  # the clip acted


def test_clip_is_a_per_token_scale_of_theta():
    """Clipping token t's surprise to norm tau is the bare rule with theta_t * min(1, tau / |u_t|)."""
    tensors, state = _inputs(1, 2, 9, 4, 2, seed=29)
    q, k, v, theta, eta, alpha = tensors
    clip = _median_surprise_norm(tensors, state)
    y, final = memory_chunked(*tensors, state, chunk_size=1, surprise_clip=clip)
    # chunk 1: every surprise is taken at the latest weights, so the factor is computed token by token
    weights, momentum, scaled = list(state.weights), list(state.momentum), []
    for t in range(9):
        step = [x[:, :, t:t + 1] for x in tensors]
        inputs, deltas = surprise_gradients(step[1], step[2], weights)
        factor, _ = surprise_clip_scale(inputs, deltas, clip)
        scaled.append(theta[:, :, t] * factor[..., 0, 0])
        _, st = memory_chunked(*step[:3], scaled[-1][..., None], *step[4:], type(state)(tuple(weights),
                               tuple(momentum)), chunk_size=1)
        weights, momentum = list(st.weights), list(st.momentum)
    y_bare, final_bare = memory_chunked(q, k, v, torch.stack(scaled, -1), eta, alpha, state, chunk_size=1)
    assert _rel_err(y, y_bare) < RTOL and _rel_err(final.weights[1], final_bare.weights[1]) < RTOL
    assert (torch.stack(scaled, -1) < theta).any() and (torch.stack(scaled, -1) == theta).any()


def test_clip_bounds_the_momentum_whatever_the_values():
    """|theta u_t| <= theta_max * tau for every token, so |S| <= theta_max * tau / (1 - eta_max) per
    layer: a hard bound, checked with values a million times larger than the memory's outputs."""
    tensors, state = _inputs(1, 2, 64, 4, 2, seed=31)
    q, k, v, theta, eta, alpha = tensors
    tau = 0.5
    _, final = memory_chunked(q, k, 1e6 * v, theta, eta, alpha, state, chunk_size=8, surprise_clip=tau)
    state0 = max(s.norm(dim=(-2, -1)).max() for s in state.momentum)
    bound = state0 + theta.max() * tau / (1 - eta.max())
    assert all(s.norm(dim=(-2, -1)).max() <= bound for s in final.momentum)
    _, bare = memory_chunked(q, k, 1e6 * v, theta, eta, alpha, state, chunk_size=8)
    assert all(not s.norm(dim=(-2, -1)).max() <= 1e3 * bound for s in bare.momentum)  # far above, or NaN


@pytest.mark.parametrize("interval", [2, 3, 7])
def test_state_interval_recomputes_the_same_numbers(interval):
    """Keeping every k-th chunk-start state and recomputing the others in backward repeats the
    forward's operations exactly: outputs, final state and every gradient are bit-identical."""
    tensors, state = _inputs(2, 2, 26, 4, 2, seed=37, requires_grad=True)  # 7 chunks of 4, the last short
    leaves = list(tensors) + list(state.weights) + list(state.momentum)
    clip = _median_surprise_norm(tensors, state)
    results = []
    for k in (1, interval):
        y, final = memory_chunked(*tensors, state, chunk_size=4, surprise_clip=clip, state_interval=k)
        loss = (y * y.detach()).sum() + sum((t * t.detach()).sum() for t in final.weights + final.momentum)
        results.append([y, *final.weights, *final.momentum, *torch.autograd.grad(loss, leaves)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(ValueError, match="state_interval"):
        memory_chunked(*tensors, state, chunk_size=4, state_interval=0)


def test_surprise_is_the_autograd_gradient_of_the_inner_loss():
    (q, k, v, *_), state = _inputs(1, 2, 5, 4, 3, seed=3)
    weights = [w.clone().requires_grad_(True) for w in state.weights]
    loss = ((memory_read(k, weights) - v) ** 2).sum()
    auto = torch.autograd.grad(loss, weights)
    inputs, deltas = surprise_gradients(k, v, weights)
    for a, d, ref in zip(inputs, deltas, auto):
        assert _rel_err(a.transpose(-1, -2) @ d, ref) < 1e-12


def test_chunk_one_is_the_plain_recurrence_written_out():
    """With b = 1 every gradient is taken at the latest weights: the exact recurrence of Eqs. 13-15."""
    (q, k, v, theta, eta, alpha), state = _inputs(1, 1, 6, 3, 1, seed=5)
    W, S = state.weights[0][0, 0].clone(), state.momentum[0][0, 0].clone()
    ys = []
    for t in range(6):
        kt, vt = k[0, 0, t], v[0, 0, t]
        u = 2.0 * torch.outer(kt, kt @ W - vt)
        S = eta[0, 0, t] * S - theta[0, 0, t] * u
        W = (1 - alpha[0, 0, t]) * W + S
        ys.append(q[0, 0, t] @ W)
    y, final = memory_chunked(q, k, v, theta, eta, alpha, state, chunk_size=1)
    assert _rel_err(y[0, 0], torch.stack(ys)) < RTOL
    assert _rel_err(final.weights[0][0, 0], W) < RTOL


def test_chunk_start_rule_differs_from_per_token_rule():
    """Chunking is a different (cheaper) rule, not the same numbers: guards against silent fallbacks."""
    tensors, state = _inputs(1, 1, 8, 4, 2, seed=9)
    y1, _ = memory_chunked(*tensors, state, chunk_size=1)
    y4, _ = memory_chunked(*tensors, state, chunk_size=4)
    assert _rel_err(y4, y1) > 1e-6


def test_memory_is_per_sequence_and_causal():
    tensors, state = _inputs(2, 1, 10, 4, 2, seed=11)
    y, _ = memory_chunked(*tensors, state, chunk_size=4)
    # changing sequence 1 leaves sequence 0 untouched
    q, k, v, th, et, al = (t.clone() for t in tensors)
    k[1] += 1.0
    v[1] -= 1.0
    y2, _ = memory_chunked(q, k, v, th, et, al, state, chunk_size=4)
    assert torch.equal(y2[0], y[0]) and not torch.allclose(y2[1], y[1])
    # changing token 6 (inside the second chunk) leaves outputs 0..5 unchanged, changes 6
    q, k, v, th, et, al = (t.clone() for t in tensors)
    k[:, :, 6] += 1.0
    y3, _ = memory_chunked(q, k, v, th, et, al, state, chunk_size=4)
    assert torch.allclose(y3[:, :, :6], y[:, :, :6], rtol=0, atol=1e-14)
    assert not torch.allclose(y3[:, :, 6], y[:, :, 6])


def test_state_passing_equals_one_call_on_chunk_boundaries():
    tensors, state = _inputs(1, 2, 12, 4, 2, seed=13)
    y, final = memory_chunked(*tensors, state, chunk_size=4)
    first = [t[:, :, :8] for t in tensors]
    second = [t[:, :, 8:] for t in tensors]
    ya, mid = memory_chunked(*first, state, chunk_size=4)
    yb, end = memory_chunked(*second, mid, chunk_size=4)
    assert _rel_err(torch.cat([ya, yb], dim=2), y) < RTOL
    for a, b in zip(end.weights + end.momentum, final.weights + final.momentum):
        assert _rel_err(a, b) < RTOL


def test_low_precision_inputs_keep_fp32_state_and_extreme_gates_stay_finite():
    tensors, state = _inputs(1, 2, 300, 4, 2, seed=17, dtype=torch.float32)
    q, k, v, theta, eta, alpha = tensors
    eta = torch.full_like(eta, 1e-6)          # products of 64 of these underflow in linear space
    alpha = torch.full_like(alpha, 1 - 1e-6)
    y, final = memory_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), theta, eta, alpha, state, chunk_size=64)
    assert y.dtype == torch.bfloat16
    assert all(w.dtype == torch.float32 for w in final.weights + final.momentum)
    assert torch.isfinite(y.float()).all() and all(torch.isfinite(w).all() for w in final.weights)


def test_init_state_broadcasts_and_backpropagates_to_m0():
    m0 = [torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)]
    state = init_state(m0, batch_size=3)
    assert state.weights[0].shape == (3, 2, 4, 8) and float(state.momentum[1].abs().sum()) == 0.0
    tensors, _ = _inputs(3, 2, 5, 4, 2, seed=19)
    y, _ = memory_chunked(*tensors, state, chunk_size=2)
    y.sum().backward()
    assert m0[0].grad is not None and m0[0].grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    tensors, state = _inputs(1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        memory_chunked(*tensors, state, chunk_size=0)
    with pytest.raises(ValueError, match="activation"):
        memory_chunked(*tensors, state, chunk_size=2, activation="relu")
    q, k, v, th, et, al = tensors
    with pytest.raises(ValueError, match="theta"):
        memory_chunked(q, k, v, th[..., :3], et, al, state, chunk_size=2)
    for fn in (memory_chunked, memory_recurrent):
        for bad in (-1.0, float("nan")):
            with pytest.raises(ValueError, match="surprise_clip"):
                fn(*tensors, state, chunk_size=2, surprise_clip=bad)


def test_state_math_ignores_an_outer_bf16_autocast():
    tensors, state = _inputs(1, 2, 10, 8, 2, seed=23, dtype=torch.float32)
    y_ref, s_ref = memory_chunked(*tensors, state, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = memory_chunked(*tensors, state, chunk_size=4)
        r = memory_read(tensors[0], s.weights)
    assert y.dtype == torch.float32 and r.dtype == torch.float32
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(s.weights, s_ref.weights))
