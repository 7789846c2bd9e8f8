"""Triton kernels of the chunked dual form (forward and backward), one program per (sequence, head).

The math is :class:`titans_pretrain.models.memory_ops._DualForm`'s, line for line: see its docstring
for the names (``z``, ``a``, ``d``, ``e``, ``h``, ``x``, ``P``). Design (docs/kernels.md says why):

* grid = ``B*H`` programs; each walks its chunks in order, so the sequential chunk loop is one
  launch instead of dozens of small ones per chunk;
* per chunk it fuses the key path, the closed-form inner backward, the dual-form read and the
  chunk-end state update; the ``b x b`` gate coefficient matrices are built outside (all chunks at
  once, in PyTorch, so that autograd carries their gradients to the gates) and streamed in;
* the state (weights and momentum, fp32) lives in global memory, in slots: slot ``c`` holds the
  start of chunk ``c``, and forward writes every slot (the only thing backward needs) or, in
  inference, alternates between two. Depth 2 walks the hidden width in tiles of ``EB`` units, so a
  program never holds more than a tile of the ``D x E`` state: whole, one head's state at the
  issue's shape (256 KiB) does not fit an SM's shared memory, and the kernel could not launch;
* backward walks the chunks in reverse, recomputes the chunk's activations from its saved state,
  and carries the state gradient from chunk to chunk the same way.

Depth 1 and 2 memories (``D -> D`` and ``D -> E -> D``); every matrix dimension is a power of two
>= 16 (``tl.dot``).

On CPU these run under Triton's interpreter (numpy; ``TRITON_INTERPRET=1`` before triton is imported):
that is how the tests check them without a GPU. ``bench/kernel_resources.py`` compiles them for a
GPU architecture on CPU and reports their registers, spills and shared memory.
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
def _chunk_end_gates(BE, FE, ME, GE, NE, cc, BT: tl.constexpr):
    """Chunk ``cc``'s chunk-end coefficients: the scalars ``be, fe, me`` and the ``(BT,)`` ``ge, ne``."""
    be = tl.load(BE + cc).to(tl.float32)
    fe = tl.load(FE + cc).to(tl.float32)
    me = tl.load(ME + cc).to(tl.float32)
    return be, fe, me, _vec(GE + cc * BT, BT), _vec(NE + cc * BT, BT)


@triton.jit
def _cols(ptr, t, R: tl.constexpr, C: tl.constexpr, LD: tl.constexpr):
    """Columns ``t*C .. t*C + C - 1`` of a row-major ``R x LD`` fp32 matrix (an ``R x C`` tile)."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(ptr + r[:, None] * LD + t * C + c[None, :])


@triton.jit
def _store_cols(ptr, t, x, R: tl.constexpr, C: tl.constexpr, LD: tl.constexpr):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    tl.store(ptr + r[:, None] * LD + t * C + c[None, :], x)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def mlp1_fwd_kernel(
    Q, K, V, BETA, F, G, BE, FE, ME, GE, NE,          # inputs (BH, n, b, D), coefficients (BH, n, ...)
    W1s, S1s,                                         # states (BH, n_slots, D, D); slot 0 = initial
    Y,                                                # (BH, n, b, D)
    n_chunks, n_slots,                                # n_slots = n + 1 (keep every chunk-start state) or 2 (final only)
    BT: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    """Depth-1 (linear memory) forward: the state is one ``D x D`` matrix pair, held whole."""
    pid = tl.program_id(0).to(tl.int64)
    w1 = _mat(W1s + pid * n_slots * D * D, D, D)
    s1 = _mat(S1s + pid * n_slots * D * D, D, D)
    for c in range(0, n_chunks):
        dst = pid * n_slots + (c + 1) % n_slots
        cc = pid * n_chunks + c
        q, k, v, G_c, beta, f = _chunk_inputs(Q, K, V, G, BETA, F, cc, BT, D)
        d1 = 2.0 * (_dot(k, w1, PREC) - v)
        y = (beta[:, None] * _dot(q, w1, PREC) + f[:, None] * _dot(q, s1, PREC)
             - _dot(G_c * _dot(q, tl.trans(k), PREC), d1, PREC))
        _store_mat(Y + cc * BT * D, y, BT, D)
        be, fe, me, ge, ne = _chunk_end_gates(BE, FE, ME, GE, NE, cc, BT)
        kt = tl.trans(k)
        w1_new = be * w1 + fe * s1 - _dot(kt, ge[:, None] * d1, PREC)
        s1 = me * s1 - _dot(kt, ne[:, None] * d1, PREC)
        w1 = w1_new
        _store_mat(W1s + dst * D * D, w1, D, D)
        _store_mat(S1s + dst * D * D, s1, D, D)


@triton.jit
def mlp1_bwd_kernel(
    Q, K, V, BETA, F, G, BE, FE, ME, GE, NE,
    W1s, S1s,                                         # every chunk-start state, from forward (BH, n + 1, D, D)
    DY,                                               # (BH, n, b, D)
    DW1, DS1,                                         # (BH, 2, D, D): in slot 0 the final state's gradient,
                                                      # out in slot n % 2 the initial state's
    DQ, DK, DV, DBETA, DF, DG, DBE, DFE, DME, DGE, DNE,
    n_chunks,
    BT: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    """Depth-1 backward: chunks in reverse, names as in ``_DualForm.backward``."""
    pid = tl.program_id(0).to(tl.int64)
    n_slots = n_chunks + 1
    dw1 = _mat(DW1 + pid * 2 * D * D, D, D)
    ds1 = _mat(DS1 + pid * 2 * D * D, D, D)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        slot = pid * n_slots + c
        w1 = _mat(W1s + slot * D * D, D, D)
        s1 = _mat(S1s + slot * D * D, D, D)
        cc = pid * n_chunks + c
        q, k, v, G_c, beta, f = _chunk_inputs(Q, K, V, G, BETA, F, cc, BT, D)
        be, fe, me, ge, ne = _chunk_end_gates(BE, FE, ME, GE, NE, cc, BT)
        d1 = 2.0 * (_dot(k, w1, PREC) - v)
        P0 = _dot(q, tl.trans(k), PREC)
        dx = _mat(DY + cc * BT * D, BT, D)

        # Chunk end: W' = be W + fe S - k^T (ge d1),  S' = me S - k^T (ne d1).
        tl.store(DBE + cc, tl.sum(dw1 * w1))
        tl.store(DFE + cc, tl.sum(dw1 * s1))
        tl.store(DME + cc, tl.sum(ds1 * s1))
        dU_w = _dot(k, dw1, PREC)
        dU_s = _dot(k, ds1, PREC)
        dD1 = -(ge[:, None] * dU_w + ne[:, None] * dU_s)
        dA0 = -(_dot(ge[:, None] * d1, tl.trans(dw1), PREC) + _dot(ne[:, None] * d1, tl.trans(ds1), PREC))
        # Read: y = beta (q W1) + f (q S1) - (G * P0) d1,  P0 = q k^T.
        dhW = _dot(dx, tl.trans(w1), PREC)
        dhS = _dot(dx, tl.trans(s1), PREC)
        dR = -_dot(dx, tl.trans(d1), PREC)
        dD1 -= _dot(tl.trans(G_c * P0), dx, PREC)
        dP = dR * G_c
        dA0 += _dot(tl.trans(dP), q, PREC)
        # Key path: d1 = 2 (k W1 - v).
        dz1 = 2.0 * dD1
        dA0 += _dot(dz1, tl.trans(w1), PREC)
        qt = tl.trans(q)
        dw1_new = be * dw1 + _dot(qt, beta[:, None] * dx, PREC) + _dot(tl.trans(k), dz1, PREC)
        ds1 = me * ds1 + fe * dw1 + _dot(qt, f[:, None] * dx, PREC)
        dw1 = dw1_new

        _store_mat(DQ + cc * BT * D, beta[:, None] * dhW + f[:, None] * dhS + _dot(dP, k, PREC), BT, D)
        _store_mat(DK + cc * BT * D, dA0, BT, D)
        _store_mat(DV + cc * BT * D, -dz1, BT, D)
        rows = tl.arange(0, BT)
        tl.store(DBETA + cc * BT + rows, tl.sum(dhW * q, axis=1))
        tl.store(DF + cc * BT + rows, tl.sum(dhS * q, axis=1))
        tl.store(DGE + cc * BT + rows, -tl.sum(dU_w * d1, axis=1))
        tl.store(DNE + cc * BT + rows, -tl.sum(dU_s * d1, axis=1))
        _store_mat(DG + cc * BT * BT, dR * P0, BT, BT)
    out = pid * 2 + n_chunks % 2
    _store_mat(DW1 + out * D * D, dw1, D, D)
    _store_mat(DS1 + out * D * D, ds1, D, D)


@triton.jit
def _state_tiles(W1, S1, W2, S2, slot, t, D: tl.constexpr, E: tl.constexpr, EB: tl.constexpr):
    """Tile ``t`` (hidden units ``t*EB ..``) of one state: ``W1, S1`` columns ``(D, EB)``, ``W2, S2``
    rows ``(EB, D)``."""
    w1 = _cols(W1 + slot * D * E, t, D, EB, E)
    s1 = _cols(S1 + slot * D * E, t, D, EB, E)
    w2 = _mat(W2 + slot * E * D + t * EB * D, EB, D)
    s2 = _mat(S2 + slot * E * D + t * EB * D, EB, D)
    return w1, s1, w2, s2


@triton.jit
def _tile_forward(q, k, d2, GP0, beta, f, w1, s1, w2, ACT: tl.constexpr, PREC: tl.constexpr):
    """One hidden tile of the chunk's key path, inner backward and layer-1 read, given the chunk's
    ``d2`` (which needs every tile): ``(z1, a1, g1 = act'(z1), e1, d1, x1, h1)``."""
    z1 = _dot(k, w1, PREC)
    a1 = _act(z1, ACT)
    g1 = _act_grad(z1, ACT)
    e1 = _dot(d2, tl.trans(w2), PREC)
    d1 = g1 * e1
    x1 = (beta[:, None] * _dot(q, w1, PREC) + f[:, None] * _dot(q, s1, PREC) - _dot(GP0, d1, PREC))
    return z1, a1, g1, e1, d1, x1, _act(x1, ACT)


@triton.jit
def _chunk_d2(k, v, W1s, W2s, slot, D: tl.constexpr, E: tl.constexpr, EB: tl.constexpr,
              ACT: tl.constexpr, PREC: tl.constexpr):
    """``d2 = 2 (act(k W1) W2 - v)``: the layer-2 delta, summed over all hidden tiles."""
    z2 = tl.zeros((k.shape[0], D), dtype=tl.float32)
    for t in range(0, E // EB):
        w1 = _cols(W1s + slot * D * E, t, D, EB, E)
        w2 = _mat(W2s + slot * E * D + t * EB * D, EB, D)
        z2 += _dot(_act(_dot(k, w1, PREC), ACT), w2, PREC)
    return 2.0 * (z2 - v)


@triton.jit
def mlp2_fwd_kernel(
    Q, K, V, BETA, F, G, BE, FE, ME, GE, NE,          # inputs (BH, n, b, D), coefficients (BH, n, ...)
    W1s, S1s, W2s, S2s,                               # states (BH, n_slots, D, E) / (BH, n_slots, E, D),
                                                      # slot 0 = initial
    Y,                                                # (BH, n, b, D)
    n_chunks, n_slots,                                # n_slots = n + 1 (keep every chunk-start state) or 2 (final only)
    BT: tl.constexpr, D: tl.constexpr, E: tl.constexpr, EB: tl.constexpr,
    ACT: tl.constexpr, PREC: tl.constexpr,
):
    """Depth-2 forward, tiled over the hidden width: the state lives in global memory (L2 at these
    sizes), slot ``c % n_slots`` holds the start of chunk ``c``; each chunk reads its slot and writes
    the next, one ``EB``-wide hidden tile at a time, so no program holds more than a tile of it."""
    pid = tl.program_id(0).to(tl.int64)
    for c in range(0, n_chunks):
        src = pid * n_slots + c % n_slots
        dst = pid * n_slots + (c + 1) % n_slots
        cc = pid * n_chunks + c
        q, k, v, G_c, beta, f = _chunk_inputs(Q, K, V, G, BETA, F, cc, BT, D)
        be, fe, me, ge, ne = _chunk_end_gates(BE, FE, ME, GE, NE, cc, BT)
        ge = ge[:, None]
        ne = ne[:, None]
        d2 = _chunk_d2(k, v, W1s, W2s, src, D, E, EB, ACT, PREC)   # pass 1: needs every tile
        GP0 = G_c * _dot(q, tl.trans(k), PREC)
        kt = tl.trans(k)
        y = tl.zeros((BT, D), dtype=tl.float32)
        P1 = tl.zeros((BT, BT), dtype=tl.float32)
        for t in range(0, E // EB):                                 # pass 2: read, then next state
            w1, s1, w2, s2 = _state_tiles(W1s, S1s, W2s, S2s, src, t, D, E, EB)
            z1, a1, g1, e1, d1, x1, h1 = _tile_forward(q, k, d2, GP0, beta, f, w1, s1, w2, ACT, PREC)
            P1 += _dot(h1, tl.trans(a1), PREC)
            y += _dot(beta[:, None] * h1, w2, PREC) + _dot(f[:, None] * h1, s2, PREC)
            # Chunk end: W' = be W + fe S - a^T (ge d),  S' = me S - a^T (ne d).
            _store_cols(W1s + dst * D * E, t, be * w1 + fe * s1 - _dot(kt, ge * d1, PREC), D, EB, E)
            _store_cols(S1s + dst * D * E, t, me * s1 - _dot(kt, ne * d1, PREC), D, EB, E)
            _store_mat(W2s + dst * E * D + t * EB * D, be * w2 + fe * s2 - _dot(tl.trans(ge * a1), d2, PREC), EB, D)
            _store_mat(S2s + dst * E * D + t * EB * D, me * s2 - _dot(tl.trans(ne * a1), d2, PREC), EB, D)
        y -= _dot(G_c * P1, d2, PREC)
        _store_mat(Y + cc * BT * D, y, BT, D)
        tl.debug_barrier()  # the next chunk reads what every thread of this program just wrote


@triton.jit
def mlp2_bwd_kernel(
    Q, K, V, BETA, F, G, BE, FE, ME, GE, NE,
    W1s, S1s, W2s, S2s,                               # every chunk-start state, from forward (BH, n + 1, ...)
    DY,                                               # (BH, n, b, D)
    DW1, DS1, DW2, DS2,                               # (BH, 2, ...): in slot 0 the final state's gradient,
                                                      # out in slot n % 2 the initial state's
    DQ, DK, DV, DBETA, DF, DG, DBE, DFE, DME, DGE, DNE,
    n_chunks,
    BT: tl.constexpr, D: tl.constexpr, E: tl.constexpr, EB: tl.constexpr,
    ACT: tl.constexpr, PREC: tl.constexpr,
):
    """Depth-2 backward, tiled like the forward. Per chunk (in reverse), three passes over the hidden
    tiles: (1) ``d2`` and the reductions of the layer-2 chunk end, (2) ``P1`` and every other
    reduction over the hidden width (the read's ``dx`` chain, ``dD2``, ``dR1``, ``dx W1^T``), (3) the
    tile-local gradients: ``dk`` and the gradient of the chunk-start state, written to the other
    gradient slot. Names follow ``_DualForm.backward``."""
    pid = tl.program_id(0).to(tl.int64)
    n_slots = n_chunks + 1
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        src = pid * n_slots + c
        gin = pid * 2 + i % 2
        gout = pid * 2 + (i + 1) % 2
        cc = pid * n_chunks + c
        q, k, v, G_c, beta, f = _chunk_inputs(Q, K, V, G, BETA, F, cc, BT, D)
        be, fe, me, ge, ne = _chunk_end_gates(BE, FE, ME, GE, NE, cc, BT)
        dy = _mat(DY + cc * BT * D, BT, D)

        # Pass 1: d2; the layer-2 chunk end's dU = a1 dW2 and the gate scalars' gradients.
        z2 = tl.zeros((BT, D), dtype=tl.float32)
        dU_w2 = tl.zeros((BT, D), dtype=tl.float32)
        dU_s2 = tl.zeros((BT, D), dtype=tl.float32)
        dbe = 0.0
        dfe = 0.0
        dme = 0.0
        for t in range(0, E // EB):
            w1, s1, w2, s2 = _state_tiles(W1s, S1s, W2s, S2s, src, t, D, E, EB)
            dw1, ds1, dw2, ds2 = _state_tiles(DW1, DS1, DW2, DS2, gin, t, D, E, EB)
            a1 = _act(_dot(k, w1, PREC), ACT)
            z2 += _dot(a1, w2, PREC)
            dU_w2 += _dot(a1, dw2, PREC)
            dU_s2 += _dot(a1, ds2, PREC)
            dbe += tl.sum(dw1 * w1) + tl.sum(dw2 * w2)
            dfe += tl.sum(dw1 * s1) + tl.sum(dw2 * s2)
            dme += tl.sum(ds1 * s1) + tl.sum(ds2 * s2)
        d2 = 2.0 * (z2 - v)
        dge = -tl.sum(dU_w2 * d2, axis=1)
        dne = -tl.sum(dU_s2 * d2, axis=1)
        dD2 = -(ge[:, None] * dU_w2 + ne[:, None] * dU_s2)
        P0 = _dot(q, tl.trans(k), PREC)
        GP0 = G_c * P0
        dR2 = -_dot(dy, tl.trans(d2), PREC)      # read, layer 2: y = beta h1 W2 + f h1 S2 - (G * P1) d2
        dP2 = dR2 * G_c

        # Pass 2: P1 and the reductions over the hidden width.
        P1 = tl.zeros((BT, BT), dtype=tl.float32)
        dR1 = tl.zeros((BT, BT), dtype=tl.float32)
        dhW1 = tl.zeros((BT, D), dtype=tl.float32)
        dhS1 = tl.zeros((BT, D), dtype=tl.float32)
        dbeta = tl.zeros((BT,), dtype=tl.float32)
        df = tl.zeros((BT,), dtype=tl.float32)
        for t in range(0, E // EB):
            w1, s1, w2, s2 = _state_tiles(W1s, S1s, W2s, S2s, src, t, D, E, EB)
            dw1 = _cols(DW1 + gin * D * E, t, D, EB, E)
            ds1 = _cols(DS1 + gin * D * E, t, D, EB, E)
            z1, a1, g1, e1, d1, x1, h1 = _tile_forward(q, k, d2, GP0, beta, f, w1, s1, w2, ACT, PREC)
            P1 += _dot(h1, tl.trans(a1), PREC)
            dhW = _dot(dy, tl.trans(w2), PREC)
            dhS = _dot(dy, tl.trans(s2), PREC)
            dbeta += tl.sum(dhW * h1, axis=1)
            df += tl.sum(dhS * h1, axis=1)
            dx = _act_grad(x1, ACT) * (beta[:, None] * dhW + f[:, None] * dhS + _dot(dP2, a1, PREC))
            dU_w = _dot(k, dw1, PREC)             # chunk end, layer 1
            dU_s = _dot(k, ds1, PREC)
            dge -= tl.sum(dU_w * d1, axis=1)
            dne -= tl.sum(dU_s * d1, axis=1)
            dD1 = -(ge[:, None] * dU_w + ne[:, None] * dU_s) - _dot(tl.trans(GP0), dx, PREC)
            dhW1 += _dot(dx, tl.trans(w1), PREC)   # read, layer 1: x1 = beta q W1 + f q S1 - (G * P0) d1
            dhS1 += _dot(dx, tl.trans(s1), PREC)
            dR1 -= _dot(dx, tl.trans(d1), PREC)
            dD2 += _dot(g1 * dD1, w2, PREC)       # key path: d1 = act'(z1) (d2 W2^T)
        dD2 -= _dot(tl.trans(G_c * P1), dy, PREC)
        dz2 = 2.0 * dD2
        dG = dR2 * P1 + dR1 * P0
        dP1 = dR1 * G_c
        dbeta += tl.sum(dhW1 * q, axis=1)
        df += tl.sum(dhS1 * q, axis=1)
        dq = beta[:, None] * dhW1 + f[:, None] * dhS1 + _dot(dP1, k, PREC)
        dA0 = _dot(tl.trans(dP1), q, PREC)

        # Pass 3: dk and the gradient of the chunk-start state, tile by tile.
        qt = tl.trans(q)
        kt = tl.trans(k)
        for t in range(0, E // EB):
            w1, s1, w2, s2 = _state_tiles(W1s, S1s, W2s, S2s, src, t, D, E, EB)
            dw1, ds1, dw2, ds2 = _state_tiles(DW1, DS1, DW2, DS2, gin, t, D, E, EB)
            z1, a1, g1, e1, d1, x1, h1 = _tile_forward(q, k, d2, GP0, beta, f, w1, s1, w2, ACT, PREC)
            dhW = _dot(dy, tl.trans(w2), PREC)
            dhS = _dot(dy, tl.trans(s2), PREC)
            dx = _act_grad(x1, ACT) * (beta[:, None] * dhW + f[:, None] * dhS + _dot(dP2, a1, PREC))
            dD1 = (-(ge[:, None] * _dot(k, dw1, PREC) + ne[:, None] * _dot(k, ds1, PREC))
                   - _dot(tl.trans(GP0), dx, PREC))
            de = g1 * dD1
            dA1 = (_dot(tl.trans(dP2), h1, PREC) + _dot(dz2, tl.trans(w2), PREC)
                   - ge[:, None] * _dot(d2, tl.trans(dw2), PREC) - ne[:, None] * _dot(d2, tl.trans(ds2), PREC))
            dz1 = dD1 * e1 * _act_grad2(z1, ACT) + g1 * dA1
            dA0 += (_dot(dz1, tl.trans(w1), PREC)
                    - _dot(ge[:, None] * d1, tl.trans(dw1), PREC) - _dot(ne[:, None] * d1, tl.trans(ds1), PREC))
            _store_cols(DW1 + gout * D * E, t,
                        be * dw1 + _dot(qt, beta[:, None] * dx, PREC) + _dot(kt, dz1, PREC), D, EB, E)
            _store_cols(DS1 + gout * D * E, t, me * ds1 + fe * dw1 + _dot(qt, f[:, None] * dx, PREC), D, EB, E)
            _store_mat(DW2 + gout * E * D + t * EB * D,
                       be * dw2 + _dot(tl.trans(beta[:, None] * h1), dy, PREC) + _dot(tl.trans(de), d2, PREC)
                       + _dot(tl.trans(a1), dz2, PREC), EB, D)
            _store_mat(DS2 + gout * E * D + t * EB * D, me * ds2 + fe * dw2 + _dot(tl.trans(f[:, None] * h1), dy, PREC),
                       EB, D)

        _store_mat(DQ + cc * BT * D, dq, BT, D)
        _store_mat(DK + cc * BT * D, dA0, BT, D)
        _store_mat(DV + cc * BT * D, -dz2, BT, D)
        rows = tl.arange(0, BT)
        tl.store(DBETA + cc * BT + rows, dbeta)
        tl.store(DF + cc * BT + rows, df)
        tl.store(DGE + cc * BT + rows, dge)
        tl.store(DNE + cc * BT + rows, dne)
        _store_mat(DG + cc * BT * BT, dG, BT, BT)
        tl.store(DBE + cc, dbe)
        tl.store(DFE + cc, dfe)
        tl.store(DME + cc, dme)
        tl.debug_barrier()  # the next chunk reads the gradient slot every thread just wrote
