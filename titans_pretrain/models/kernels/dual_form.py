"""Triton kernels of the chunked dual form (forward and backward), one program per (sequence, head).

The math is :class:`titans_pretrain.models.memory_ops._DualForm`'s, line for line: see its docstring
for the names (``z``, ``a``, ``d``, ``e``, ``h``, ``x``, ``P``). Design (docs/kernels.md says why):

* grid = ``B*H`` programs; each walks its chunks in order with the memory state (weights and
  momentum, fp32) carried from chunk to chunk inside the program, so the sequential chunk loop is
  one launch instead of dozens of small ones per chunk;
* per chunk it fuses the key path, the closed-form inner backward, the dual-form read and the
  chunk-end state update; the ``b x b`` gate coefficient matrices are built outside (all chunks at
  once, in PyTorch, so that autograd carries their gradients to the gates) and streamed in;
* forward stores every chunk-start state (the only thing backward needs); backward walks the chunks
  in reverse, recomputes the chunk's activations from its saved state, and carries the state
  gradient from chunk to chunk the same way.

Depth 1 and 2 memories (``D -> D`` and ``D -> E -> D``); every matrix dimension is a power of two
>= 16 (``tl.dot``). Depth 1 uses the ``W1`` slots with ``E = D``; its ``W2`` slots are dummies.

On CPU these run under Triton's interpreter (numpy; ``TRITON_INTERPRET=1`` before triton is imported):
that is how the tests check them without a GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # gelu (exact, erf)
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:  # silu
        return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """act'(z)."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    else:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))


@triton.jit
def _act_grad2(z, ACT: tl.constexpr):
    """act''(z)."""
    if ACT == 0:
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return pdf * (2.0 - z * z)
    else:
        s = tl.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


@triton.jit
def _mat(ptr, R: tl.constexpr, C: tl.constexpr):
    """Load a contiguous row-major ``R x C`` fp32 tile."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(ptr + r[:, None] * C + c[None, :]).to(tl.float32)


@triton.jit
def _store_mat(ptr, x, R: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    tl.store(ptr + r[:, None] * C + c[None, :], x)


@triton.jit
def _vec(ptr, N: tl.constexpr):
    return tl.load(ptr + tl.arange(0, N)).to(tl.float32)


@triton.jit
def _chunk_inputs(Q, K, V, G, BETA, F, cc, BT: tl.constexpr, D: tl.constexpr):
    """Chunk ``cc``'s q, k, v ``(BT, D)``, coefficient matrix ``(BT, BT)``, beta and f ``(BT,)``."""
    q = _mat(Q + cc * BT * D, BT, D)
    k = _mat(K + cc * BT * D, BT, D)
    v = _mat(V + cc * BT * D, BT, D)
    G_c = _mat(G + cc * BT * BT, BT, BT)
    return q, k, v, G_c, _vec(BETA + cc * BT, BT), _vec(F + cc * BT, BT)


@triton.jit
def _chunk_forward(q, k, v, G, beta, f, w1, s1, w2, s2,
                   DEPTH: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr):
    """Key path, inner backward and dual-form read of one chunk at its chunk-start state.

    Returns ``(z1, a1, d1, e1, d2, x1, h1, P0, P1, y)``; for depth 1 the layer-2 entries are
    placeholders (``a1 = k``, ``d2 = d1``, ``h1 = q``, ``P1 = P0``) that callers do not use.
    """
    z1 = tl.dot(k, w1, input_precision=PREC)
    P0 = tl.dot(q, tl.trans(k), input_precision=PREC)
    if DEPTH == 2:
        a1 = _act(z1, ACT)
        z2 = tl.dot(a1, w2, input_precision=PREC)
        d2 = 2.0 * (z2 - v)
        e1 = tl.dot(d2, tl.trans(w2), input_precision=PREC)
        d1 = _act_grad(z1, ACT) * e1
    else:
        a1 = k
        d1 = 2.0 * (z1 - v)
        d2 = d1
        e1 = d1
    x1 = (beta[:, None] * tl.dot(q, w1, input_precision=PREC)
          + f[:, None] * tl.dot(q, s1, input_precision=PREC)
          - tl.dot(G * P0, d1, input_precision=PREC))
    if DEPTH == 2:
        h1 = _act(x1, ACT)
        P1 = tl.dot(h1, tl.trans(a1), input_precision=PREC)
        y = (beta[:, None] * tl.dot(h1, w2, input_precision=PREC)
             + f[:, None] * tl.dot(h1, s2, input_precision=PREC)
             - tl.dot(G * P1, d2, input_precision=PREC))
    else:
        h1 = q
        P1 = P0
        y = x1
    return z1, a1, d1, e1, d2, x1, h1, P0, P1, y


@triton.jit
def dual_form_fwd_kernel(
    Q, K, V, BETA, F, G, BE, FE, ME, GE, NE,          # inputs (BH, n, b, D), coefficients (BH, n, ...)
    W1, S1, W2, S2,                                   # initial state (BH, D, E), (BH, E, D)
    Y,                                                # (BH, n, b, D)
    W1s, S1s, W2s, S2s,                               # chunk-start states (BH, n_saved, ...)
    n_chunks, n_saved,                                # n_saved = n + 1 (for backward) or 1 (final only)
    BT: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    DEPTH: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, SAVE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    w1 = _mat(W1 + pid * D * E, D, E)
    s1 = _mat(S1 + pid * D * E, D, E)
    w2 = _mat(W2 + pid * E * D, E, D)
    s2 = _mat(S2 + pid * E * D, E, D)
    for c in range(0, n_chunks):
        if SAVE:
            slot = pid * n_saved + c
            _store_mat(W1s + slot * D * E, w1, D, E)
            _store_mat(S1s + slot * D * E, s1, D, E)
            if DEPTH == 2:
                _store_mat(W2s + slot * E * D, w2, E, D)
                _store_mat(S2s + slot * E * D, s2, E, D)
        cc = pid * n_chunks + c
        q, k, v, G_c, beta, f = _chunk_inputs(Q, K, V, G, BETA, F, cc, BT, D)
        z1, a1, d1, e1, d2, x1, h1, P0, P1, y = _chunk_forward(
            q, k, v, G_c, beta, f, w1, s1, w2, s2, DEPTH, ACT, PREC)
        _store_mat(Y + cc * BT * D, y, BT, D)
        # Chunk end: W' = be W + fe S - a^T (ge d),  S' = me S - a^T (ne d).
        be = tl.load(BE + cc).to(tl.float32)
        fe = tl.load(FE + cc).to(tl.float32)
        me = tl.load(ME + cc).to(tl.float32)
        ge = _vec(GE + cc * BT, BT)[:, None]
        ne = _vec(NE + cc * BT, BT)[:, None]
        kt = tl.trans(k)
        w1_new = be * w1 + fe * s1 - tl.dot(kt, ge * d1, input_precision=PREC)
        s1 = me * s1 - tl.dot(kt, ne * d1, input_precision=PREC)
        w1 = w1_new
        if DEPTH == 2:
            at = tl.trans(a1)
            w2_new = be * w2 + fe * s2 - tl.dot(at, ge * d2, input_precision=PREC)
            s2 = me * s2 - tl.dot(at, ne * d2, input_precision=PREC)
            w2 = w2_new
    last = pid * n_saved + n_saved - 1
    _store_mat(W1s + last * D * E, w1, D, E)
    _store_mat(S1s + last * D * E, s1, D, E)
    if DEPTH == 2:
        _store_mat(W2s + last * E * D, w2, E, D)
        _store_mat(S2s + last * E * D, s2, E, D)


@triton.jit
def dual_form_bwd_kernel(
    Q, K, V, BETA, F, G, BE, FE, ME, GE, NE,
    W1s, S1s, W2s, S2s,                               # chunk-start states saved by forward (BH, n+1, ...)
    DY,                                               # (BH, n, b, D)
    DW1, DS1, DW2, DS2,                               # in: gradient of the final state; out: of the initial
    DQ, DK, DV, DBETA, DF, DG, DBE, DFE, DME, DGE, DNE,
    n_chunks,
    BT: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    DEPTH: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_saved = n_chunks + 1
    dw1 = _mat(DW1 + pid * D * E, D, E)
    ds1 = _mat(DS1 + pid * D * E, D, E)
    dw2 = _mat(DW2 + pid * E * D, E, D)
    ds2 = _mat(DS2 + pid * E * D, E, D)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        slot = pid * n_saved + c
        w1 = _mat(W1s + slot * D * E, D, E)
        s1 = _mat(S1s + slot * D * E, D, E)
        if DEPTH == 2:
            w2 = _mat(W2s + slot * E * D, E, D)
            s2 = _mat(S2s + slot * E * D, E, D)
        else:
            w2 = w1
            s2 = s1
        cc = pid * n_chunks + c
        q, k, v, G_c, beta, f = _chunk_inputs(Q, K, V, G, BETA, F, cc, BT, D)
        be = tl.load(BE + cc).to(tl.float32)
        fe = tl.load(FE + cc).to(tl.float32)
        me = tl.load(ME + cc).to(tl.float32)
        ge = _vec(GE + cc * BT, BT)
        ne = _vec(NE + cc * BT, BT)
        z1, a1, d1, e1, d2, x1, h1, P0, P1, y = _chunk_forward(
            q, k, v, G_c, beta, f, w1, s1, w2, s2, DEPTH, ACT, PREC)
        dy = _mat(DY + cc * BT * D, BT, D)

        # Chunk end, layer 1 (input k, delta d1).
        dbe = tl.sum(dw1 * w1)
        dfe = tl.sum(dw1 * s1)
        dme = tl.sum(ds1 * s1)
        dU_w = tl.dot(k, dw1, input_precision=PREC)
        dU_s = tl.dot(k, ds1, input_precision=PREC)
        dge = -tl.sum(dU_w * d1, axis=1)
        dne = -tl.sum(dU_s * d1, axis=1)
        dD1 = -(ge[:, None] * dU_w + ne[:, None] * dU_s)
        dA0 = -(tl.dot(ge[:, None] * d1, tl.trans(dw1), input_precision=PREC)
                + tl.dot(ne[:, None] * d1, tl.trans(ds1), input_precision=PREC))
        dw1_p = be * dw1
        ds1_p = me * ds1 + fe * dw1
        if DEPTH == 2:
            # Chunk end, layer 2 (input a1, delta d2).
            dbe += tl.sum(dw2 * w2)
            dfe += tl.sum(dw2 * s2)
            dme += tl.sum(ds2 * s2)
            dU_w2 = tl.dot(a1, dw2, input_precision=PREC)
            dU_s2 = tl.dot(a1, ds2, input_precision=PREC)
            dge -= tl.sum(dU_w2 * d2, axis=1)
            dne -= tl.sum(dU_s2 * d2, axis=1)
            dD2 = -(ge[:, None] * dU_w2 + ne[:, None] * dU_s2)
            dA1 = -(tl.dot(ge[:, None] * d2, tl.trans(dw2), input_precision=PREC)
                    + tl.dot(ne[:, None] * d2, tl.trans(ds2), input_precision=PREC))
            dw2_p = be * dw2
            ds2_p = me * ds2 + fe * dw2

            # Read, layer 2: y = beta (h1 W2) + f (h1 S2) - (G * P1) d2,  P1 = h1 a1^T.
            dx = dy
            dhW = tl.dot(dx, tl.trans(w2), input_precision=PREC)
            dhS = tl.dot(dx, tl.trans(s2), input_precision=PREC)
            dbeta = tl.sum(dhW * h1, axis=1)
            df = tl.sum(dhS * h1, axis=1)
            h1t = tl.trans(h1)
            dw2_p += tl.dot(h1t, beta[:, None] * dx, input_precision=PREC)
            ds2_p += tl.dot(h1t, f[:, None] * dx, input_precision=PREC)
            dR = -tl.dot(dx, tl.trans(d2), input_precision=PREC)
            dD2 -= tl.dot(tl.trans(G_c * P1), dx, input_precision=PREC)
            dG = dR * P1
            dP = dR * G_c
            dh = beta[:, None] * dhW + f[:, None] * dhS + tl.dot(dP, a1, input_precision=PREC)
            dA1 += tl.dot(tl.trans(dP), h1, input_precision=PREC)
            dx = _act_grad(x1, ACT) * dh
        else:
            dx = dy
            dbeta = tl.zeros((BT,), dtype=tl.float32)
            df = tl.zeros((BT,), dtype=tl.float32)
            dG = tl.zeros((BT, BT), dtype=tl.float32)

        # Read, layer 1: x1 = beta (q W1) + f (q S1) - (G * P0) d1,  P0 = q k^T.
        dhW = tl.dot(dx, tl.trans(w1), input_precision=PREC)
        dhS = tl.dot(dx, tl.trans(s1), input_precision=PREC)
        dbeta += tl.sum(dhW * q, axis=1)
        df += tl.sum(dhS * q, axis=1)
        qt = tl.trans(q)
        dw1_p += tl.dot(qt, beta[:, None] * dx, input_precision=PREC)
        ds1_p += tl.dot(qt, f[:, None] * dx, input_precision=PREC)
        dR = -tl.dot(dx, tl.trans(d1), input_precision=PREC)
        dD1 -= tl.dot(tl.trans(G_c * P0), dx, input_precision=PREC)
        dG += dR * P0
        dP = dR * G_c
        dq = beta[:, None] * dhW + f[:, None] * dhS + tl.dot(dP, k, input_precision=PREC)
        dA0 += tl.dot(tl.trans(dP), q, input_precision=PREC)

        # Key path: the delta chain d1 = act'(z1) * e1, e1 = d2 W2^T, then z1 = k W1, a1 = act(z1),
        # z2 = a1 W2, d2 = 2 (z2 - v), in reverse.
        kt = tl.trans(k)
        if DEPTH == 2:
            g1 = _act_grad(z1, ACT)
            de = g1 * dD1
            dz1 = dD1 * e1 * _act_grad2(z1, ACT)
            dD2 += tl.dot(de, w2, input_precision=PREC)
            dw2_p += tl.dot(tl.trans(de), d2, input_precision=PREC)
            dz2 = 2.0 * dD2
            dv = -2.0 * dD2
            dA1 += tl.dot(dz2, tl.trans(w2), input_precision=PREC)
            dw2_p += tl.dot(tl.trans(a1), dz2, input_precision=PREC)
            dz1 += g1 * dA1
        else:
            dz1 = 2.0 * dD1
            dv = -2.0 * dD1
        dA0 += tl.dot(dz1, tl.trans(w1), input_precision=PREC)
        dw1_p += tl.dot(kt, dz1, input_precision=PREC)

        _store_mat(DQ + cc * BT * D, dq, BT, D)
        _store_mat(DK + cc * BT * D, dA0, BT, D)
        _store_mat(DV + cc * BT * D, dv, BT, D)
        rows = tl.arange(0, BT)
        tl.store(DBETA + cc * BT + rows, dbeta)
        tl.store(DF + cc * BT + rows, df)
        tl.store(DGE + cc * BT + rows, dge)
        tl.store(DNE + cc * BT + rows, dne)
        _store_mat(DG + cc * BT * BT, dG, BT, BT)
        tl.store(DBE + cc, dbe)
        tl.store(DFE + cc, dfe)
        tl.store(DME + cc, dme)
        dw1 = dw1_p
        ds1 = ds1_p
        if DEPTH == 2:
            dw2 = dw2_p
            ds2 = ds2_p
    _store_mat(DW1 + pid * D * E, dw1, D, E)
    _store_mat(DS1 + pid * D * E, ds1, D, E)
    if DEPTH == 2:
        _store_mat(DW2 + pid * E * D, dw2, E, D)
        _store_mat(DS2 + pid * E * D, ds2, E, D)
