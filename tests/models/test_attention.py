"""Attention: exact masks, persistent tokens, RoPE, sliding-window and MAC segment attention
against a naive per-query loop."""
import math

import pytest
import torch

from titans_pretrain.models.attention import (Attention, banded_blocks, mac_segment_mask, rope_cos_sin,
                                              sliding_window_mask)

pytestmark = pytest.mark.usefixtures("single_thread")

D_MODEL, H, HD, NP = 12, 2, 6, 3


@pytest.fixture
def attn():
    torch.manual_seed(0)
    a = Attention(D_MODEL, H, HD, n_persistent=NP, rope_theta=100.0).double()
    with torch.no_grad():
        a.persistent.normal_()
    return a


def naive_rope(x: torch.Tensor, pos: int, theta: float = 100.0) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + D/2]) of a (D,) vector by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        ang = pos * theta ** (-2 * i / d)
        c, s = math.cos(ang), math.sin(ang)
        out[..., i] = x[..., i] * c - x[..., i + d // 2] * s
        out[..., i + d // 2] = x[..., i + d // 2] * c + x[..., i] * s
    return out


def naive_attention(attn, queries, keys, values):
    """One query: softmax over the given (already rotated) keys; per head; then o_proj."""
    heads = []
    for h in range(H):
        sl = slice(h * HD, (h + 1) * HD)
        q = queries[sl]
        scores = torch.stack([q @ k[sl] for k in keys]) / math.sqrt(HD)
        p = torch.softmax(scores, 0)
        heads.append(sum(pi * v[sl] for pi, v in zip(p, values)))
    return attn.o_proj(torch.cat(heads))


def rot(vec, pos):
    return torch.cat([naive_rope(vec[h * HD:(h + 1) * HD], pos) for h in range(H)])


def test_sliding_window_mask_contents():
    m = sliding_window_mask(torch.arange(5), torch.arange(5), 3)
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    for window in (1, 2, 4, 7, None):  # brute force, queries offset from keys (a cache in front)
        q_pos, k_pos = torch.arange(6, 11), torch.arange(2, 11)
        m = sliding_window_mask(q_pos, k_pos, window)
        for i, qp in enumerate(q_pos.tolist()):
            for j, kp in enumerate(k_pos.tolist()):
                visible = kp <= qp and (window is None or qp - kp < window)
                assert m[i, j].item() == visible, (window, qp, kp)


def test_mac_segment_mask_contents():
    expected = torch.tensor([[1, 0, 0, 1, 0, 0],
                             [1, 1, 0, 1, 1, 0],
                             [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # columns: h_0..h_2 | x_0..x_2
    assert torch.equal(mac_segment_mask(3, 3), expected)
    assert torch.equal(mac_segment_mask(3, None), torch.ones(3, 3, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="reads"):
        mac_segment_mask(3, 2)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    from titans_pretrain.models.attention import apply_rope

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), 8, 100.0, torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 8, 100.0, torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(1007, 1003))
    assert not torch.allclose(score(7, 3), score(7, 4))
    cq, sq = rope_cos_sin(torch.tensor([5]), 8, 100.0, torch.float64)
    torch.testing.assert_close(apply_rope(q, cq, sq)[0, 0, 0], naive_rope(q[0, 0, 0], 5))


@pytest.mark.parametrize("window", [1, 3, 100])
def test_sliding_attention_matches_naive_loop_and_cache(attn, window):
    torch.manual_seed(1)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    y, cache = attn.sliding(x, window)
    pk, pv = attn.k_proj(attn.persistent), attn.v_proj(attn.persistent)  # no RoPE on persistent
    for b in range(2):
        for i in range(9):
            js = [j for j in range(9) if j <= i and i - j < window]
            keys = list(pk) + [rot(attn.k_proj(x[b, j]), j) for j in js]
            vals = list(pv) + [attn.v_proj(x[b, j]) for j in js]
            ref = naive_attention(attn, rot(attn.q_proj(x[b, i]), i), keys, vals)
            torch.testing.assert_close(y[b, i], ref, rtol=1e-10, atol=1e-12)
    assert cache.pos == 9 and cache.k.shape[2] == min(window - 1, 9)
    # the same sequence in pieces through the cache (odd piece sizes)
    parts, cache = [], None
    for a, b in ((0, 1), (1, 4), (4, 9)):
        yp, cache = attn.sliding(x[:, a:b], window, cache)
        parts.append(yp)
        assert cache.k.shape[2] <= window - 1
    torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("window,T,off", [(1, 7, 0), (4, 8, 0), (4, 13, 3), (5, 23, 2), (8, 16, 7), (3, 6, 1)])
def test_banded_blocks_equal_one_dense_call_values_and_gradients(attn, window, T, off):
    """Long sliding-window inputs are attended block by block; the result and every gradient equal
    one dense call with the full ``T x T`` mask, with cached keys in front and persistent tokens."""
    torch.manual_seed(3)
    B = 2
    q = torch.randn(B, H, T, HD, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, off + T, HD, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, off + T, HD, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(B, T, D_MODEL, dtype=torch.float64)

    def run(banded):
        if banded:
            y = attn._attend(*banded_blocks(q, k, v, window))
            y = y.reshape(B, -1, D_MODEL)[:, :T]
        else:
            pos = torch.arange(off, off + T)
            y = attn._attend(q, k, v, sliding_window_mask(pos, torch.arange(off + T), window))
        grads = torch.autograd.grad((y * weights).sum(), (q, k, v, attn.persistent))
        return y, grads

    y_band, g_band = run(True)
    y_dense, g_dense = run(False)
    torch.testing.assert_close(y_band, y_dense, rtol=1e-12, atol=1e-13)
    for a, b in zip(g_band, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_banded_blocks_refuse_more_cached_keys_than_the_window_holds():
    q = torch.zeros(1, 1, 8, 2)
    with pytest.raises(ValueError, match="cached keys"):
        banded_blocks(q, torch.zeros(1, 1, 12, 2), torch.zeros(1, 1, 12, 2), window=4)


def test_segment_attention_matches_naive_loop(attn):
    torch.manual_seed(2)
    C, n = 5, 4  # a partial segment: positions must be those of a full one
    x, ctx = torch.randn(2, n, D_MODEL, dtype=torch.float64), torch.randn(2, n, D_MODEL, dtype=torch.float64)
    y = attn.segment(x, ctx, C)
    y_none = attn.segment(x, None, C)
    pk, pv = attn.k_proj(attn.persistent), attn.v_proj(attn.persistent)
    for b in range(2):
        for i in range(n):
            keys = list(pk) + [rot(attn.k_proj(ctx[b, j]), j) for j in range(i + 1)] + \
                   [rot(attn.k_proj(x[b, j]), C + j) for j in range(i + 1)]
            vals = list(pv) + [attn.v_proj(ctx[b, j]) for j in range(i + 1)] + \
                   [attn.v_proj(x[b, j]) for j in range(i + 1)]
            q = rot(attn.q_proj(x[b, i]), C + i)
            torch.testing.assert_close(y[b, i], naive_attention(attn, q, keys, vals), rtol=1e-10, atol=1e-12)
            ref_none = naive_attention(attn, q, list(pk) + keys[NP + i + 1:], list(pv) + vals[NP + i + 1:])
            torch.testing.assert_close(y_none[b, i], ref_none, rtol=1e-10, atol=1e-12)
    # a partial segment gives the first outputs of the full one
    x_full, ctx_full = torch.cat((x, x[:, :1]), 1), torch.cat((ctx, ctx[:, :1]), 1)
    torch.testing.assert_close(attn.segment(x_full, ctx_full, C)[:, :n], y, rtol=1e-12, atol=1e-13)


def test_persistent_tokens_are_visible_to_every_query(attn):
    x = torch.randn(1, 7, D_MODEL, dtype=torch.float64)
    for out in (attn.sliding(x, 2)[0], attn.segment(x, x.flip(1), 7)):
        grads = [torch.autograd.grad(out[0, i].sum(), attn.persistent, retain_graph=True)[0] for i in range(7)]
        assert all(g.abs().sum(-1).gt(0).all() for g in grads)  # every query, every persistent token
