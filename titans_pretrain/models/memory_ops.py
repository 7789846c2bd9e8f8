"""The functional core of the Titans neural long-term memory (Behrouz et al. 2024, §3.1-3.2).

The memory of one (sequence, head) is a bias-free MLP ``D -> E -> ... -> E -> D`` whose weights are a
recurrent state. Token ``t`` writes with the surprise ``u_t``, the gradient of ``||M(k_t) - v_t||^2``,
through per-token momentum and forgetting::

    S_t = eta_t S_{t-1} - theta_t u_t          M_t = (1 - alpha_t) M_{t-1} + S_t          y_t = M_t(q_t)

and reads after its own update. Training uses the chunked rule: inside a chunk of ``chunk_size``
tokens every ``u_t`` is taken at the chunk-start weights. Two implementations of that one rule:

* :func:`memory_recurrent` walks token by token, materialising the weights after every token. It is
  slow and obviously right: the reference.
* :func:`memory_chunked` is the dual form (titans-method.md §2): per chunk, the key-path forward and
  the closed-form inner backward at the chunk-start weights, then every token's read through
  ``b x b`` coefficient matrices, without per-token weight copies.

Both take and return the state as a value (:class:`MemoryState`), so streaming, context parallelism and
the layers never need to know how the state is advanced. State and gate products are fp32 (fp64 when
the inputs are fp64) whatever the input dtype; gate products are formed from log-space cumulative sums
so that long runs of ``eta`` and ``1 - alpha`` neither under- nor overflow.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "MemoryState",
    "init_state",
    "memory_chunked",
    "memory_recurrent",
    "memory_read",
    "surprise_gradients",
]

def _no_autocast(fn):
    """State arithmetic stays fp32 under an outer bf16 autocast (the inputs are cast explicitly)."""
    @functools.wraps(fn)
    def wrapper(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)

    return wrapper


# Gates are probabilities; log(0) would turn the log-space products into NaNs (inf - inf).
_LOG_FLOOR = 1e-30


class MemoryState(NamedTuple):
    """The recurrent state of a batch of memories: one entry per memory-MLP layer.

    ``weights[i]`` and ``momentum[i]`` have shape ``(B, H, d_in, d_out)``; layer ``i`` maps
    ``h @ weights[i]``. Kept in fp32 (or fp64).
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]


def init_state(initial_weights: Sequence[Tensor], batch_size: int) -> MemoryState:
    """Expand the learned initial memory ``M_0`` (each ``(H, d_in, d_out)``) over the batch.

    Each sequence gets its own copy (a broadcast view, so gradients flow back to ``M_0``);
    momentum starts at zero.
    """
    weights = []
    for w in initial_weights:
        w = w.to(_state_dtype(w.dtype))
        weights.append(w.unsqueeze(0).expand(batch_size, *w.shape))
    momentum = tuple(torch.zeros_like(w) for w in weights)
    return MemoryState(tuple(weights), momentum)


# --------------------------------------------------------------------------------------- activations
def _gelu(z: Tensor) -> Tensor:
    return torch.nn.functional.gelu(z)


def _gelu_backprop(grad: Tensor, z: Tensor) -> Tensor:
    # One fused op that autograd can differentiate again (its double backward is built in).
    return torch.ops.aten.gelu_backward(grad, z)


def _silu(z: Tensor) -> Tensor:
    return torch.nn.functional.silu(z)


def _silu_backprop(grad: Tensor, z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return grad * (s * (1.0 + z * (1.0 - s)))


# name -> (activation, backprop(grad_out, pre_activation) = grad_out * activation'(pre_activation))
_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    "gelu": (_gelu, _gelu_backprop),
    "silu": (_silu, _silu_backprop),
}


def _activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"memory activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ shared pieces
@_no_autocast
def memory_read(q: Tensor, weights: Sequence[Tensor], *, activation: str = "gelu") -> Tensor:
    """``M(q)`` with fixed weights (no update): ``q`` is ``(B, H, T, D)``, result in ``q.dtype``."""
    act, _ = _activation(activation)
    h = q.to(weights[0].dtype)
    for w in weights[:-1]:
        h = act(h @ w)
    return (h @ weights[-1]).to(q.dtype)


def surprise_gradients(
    k: Tensor, v: Tensor, weights: Sequence[Tensor], *, activation: str = "gelu"
) -> tuple[list[Tensor], list[Tensor]]:
    """Closed-form backprop of ``sum_t ||M(k_t) - v_t||^2`` through the memory MLP at ``weights``.

    Returns ``(inputs, deltas)``: for layer ``i``, ``inputs[i]`` is its input ``a_t`` and ``deltas[i]``
    the gradient w.r.t. its output, both per token (``(..., T, d)``), so that the per-token gradient
    of layer ``i``'s weights is the outer product ``a_t^T delta_t``. No autograd inside autograd: the
    outer autograd differentiates through these ordinary tensor operations.
    """
    act, backprop = _activation(activation)
    inputs, pre_acts = [], []
    h = k
    for w in weights[:-1]:
        inputs.append(h)
        z = h @ w
        pre_acts.append(z)
        h = act(z)
    inputs.append(h)
    delta = 2.0 * (h @ weights[-1] - v)
    deltas = [delta]
    for i in range(len(weights) - 2, -1, -1):
        delta = backprop(delta @ weights[i + 1].transpose(-1, -2), pre_acts[i])
        deltas.append(delta)
    deltas.reverse()
    return inputs, deltas


def _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size):
    if q.dim() != 4 or q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"q, k, v must be (B, H, T, D) with equal shapes; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != q.shape[:-1]:
            raise ValueError(f"gate {name} must be (B, H, T) = {tuple(q.shape[:-1])}, got {tuple(g.shape)}")
    if len(state.weights) == 0 or len(state.weights) != len(state.momentum):
        raise ValueError("MemoryState needs one weight and one momentum tensor per memory layer")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


# ----------------------------------------------------------------------------------------- reference
@_no_autocast
def memory_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    state: MemoryState,
    *,
    chunk_size: int,
    activation: str = "gelu",
) -> tuple[Tensor, MemoryState]:
    """Token-by-token reference of :func:`memory_chunked` (same signature and semantics).

    Materialises the weights after every token: ``O(T)`` sequential steps, for tests only.
    """
    _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size)
    dtype = _state_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    theta, eta, alpha = theta.to(dtype), eta.to(dtype), alpha.to(dtype)
    weights = [w.to(dtype) for w in state.weights]
    momentum = [s.to(dtype) for s in state.momentum]
    T = q.shape[2]
    outputs = []
    for t in range(T):
        if t % chunk_size == 0:
            chunk_start = list(weights)
        inputs, deltas = surprise_gradients(k[:, :, t : t + 1], v[:, :, t : t + 1], chunk_start,
                                            activation=activation)
        th = theta[:, :, t, None, None]
        et = eta[:, :, t, None, None]
        keep = 1.0 - alpha[:, :, t, None, None]
        for i, (a, d) in enumerate(zip(inputs, deltas)):
            u = a.transpose(-1, -2) @ d  # (B, H, d_in, d_out): the outer product of token t
            momentum[i] = et * momentum[i] - th * u
            weights[i] = keep * weights[i] + momentum[i]
        outputs.append(memory_read(q[:, :, t : t + 1], weights, activation=activation))
    y = torch.cat(outputs, dim=2) if outputs else q.new_zeros(q.shape)
    return y, MemoryState(tuple(weights), tuple(momentum))


# --------------------------------------------------------------------------------------- dual form
def _gate_coefficients(theta: Tensor, eta: Tensor, alpha: Tensor):
    """All chunks' coefficient matrices at once; gates are ``(..., n_chunks, b)``.

    Returns ``beta, f, m`` (``(..., n, b)``), ``G`` and ``N`` (``(..., n, b, b)``, rows t, columns s):
    ``N[i, s] = theta_s prod_{s<j<=i} eta_j``, ``G = Bratio @ N`` with
    ``Bratio[t, i] = prod_{i<j<=t} (1 - alpha_j)``, ``f = Bratio @ m``. Every exponent is a difference
    of log-cumsums that is <= 0, so nothing overflows however long the products get.
    """
    log_m = torch.cumsum(torch.log(eta.clamp_min(_LOG_FLOOR)), dim=-1)
    log_beta = torch.cumsum(torch.log((1.0 - alpha).clamp_min(_LOG_FLOOR)), dim=-1)
    b = eta.shape[-1]
    causal = torch.ones(b, b, dtype=torch.bool, device=eta.device).tril()
    neg_inf = torch.tensor(float("-inf"), dtype=eta.dtype, device=eta.device)
    bratio = torch.exp(torch.where(causal, log_beta[..., :, None] - log_beta[..., None, :], neg_inf))
    decay = torch.exp(torch.where(causal, log_m[..., :, None] - log_m[..., None, :], neg_inf))
    n = decay * theta[..., None, :]
    m = torch.exp(log_m)
    g = bratio @ n
    f = (bratio @ m[..., None]).squeeze(-1)
    return torch.exp(log_beta), f, m, g, n


@_no_autocast
def memory_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    state: MemoryState,
    *,
    chunk_size: int,
    activation: str = "gelu",
) -> tuple[Tensor, MemoryState]:
    """Run the memory over ``T`` tokens in the chunked dual form; return ``(y, final_state)``.

    ``q, k, v``: ``(B, H, T, D)``; ``theta`` (already scaled by ``theta_max``), ``eta``, ``alpha``:
    ``(B, H, T)``; ``state``: the memory before token 0. Token ``t``'s gradient is taken at the
    weights of its chunk start (chunks of ``chunk_size`` from ``t = 0``; the last may be shorter),
    ``y_t = M_t(q_t)`` reads the memory after token ``t``'s own update, and the returned state is the
    one after the last token. ``y`` has ``q``'s dtype; all state arithmetic is fp32 (fp64 for fp64).

    The chunk loop has a hand-written backward (:class:`_DualForm`): one pass back over the chunks
    with the activations saved in forward, no autograd graph of thousands of small nodes. The gate
    coefficients are built outside it, so autograd carries their gradients back to the gates. On
    CUDA the loop runs as fused Triton kernels when the shape allows (:mod:`.kernels`; force either
    path with ``TITANS_MEMORY_KERNEL=torch|triton`` or ``kernels.memory_kernel(...)``).
    """
    _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size)
    _activation(activation)
    dtype = _state_dtype(q.dtype)
    B, H, T, _ = q.shape
    if T == 0:
        return q.new_zeros(q.shape), state
    b = min(chunk_size, T)
    n_chunks = -(-T // b)
    pad = n_chunks * b - T

    def chunks(x: Tensor, fill: float = 0.0) -> Tensor:
        x = x.to(dtype)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad), value=fill)
        return x.unflatten(2, (n_chunks, b))

    # Padding sits after the last real token, with theta = 0: causal coefficients keep it out of
    # every real row, and the chunk-end state is read at the last real row.
    beta, f, m, G, N = _gate_coefficients(chunks(theta), chunks(eta, 1.0), chunks(alpha))
    last = torch.full((n_chunks,), b - 1, device=q.device)
    last[-1] = (T - 1) % b
    ar = torch.arange(n_chunks, device=q.device)
    g_end, n_end = G[:, :, ar, last], N[:, :, ar, last]                  # (B, H, n, b)
    beta_end, f_end, m_end = beta[:, :, ar, last], f[:, :, ar, last], m[:, :, ar, last]  # (B, H, n)

    # The chunk loop works on (B*H)-batched 3-D tensors, so that it can use fused batched ops.
    flat = lambda x: x.reshape(B * H, *x.shape[2:])  # noqa: E731
    state_in = [flat(t.to(dtype)) for t in (*state.weights, *state.momentum)]
    depth = len(state.weights)
    dims = [("D", q.shape[-1])] + [("E", w.shape[-1]) for w in state.weights[:-1]] + [("D_out", v.shape[-1])]
    loop = _DualForm.apply
    kernels = _kernels()
    if kernels is not None and kernels.use_triton(q.device, depth, activation, dtype, b, dims):
        loop = functools.partial(kernels.apply_dual_form, _DualForm)  # the same computation, fused
    out = loop(activation, depth, *(flat(chunks(x)) for x in (q, k, v)),
               *(flat(x) for x in (beta, f, G, beta_end, f_end, m_end, g_end, n_end)), *state_in)
    y = out[0].reshape(B, H, T + pad, -1)[:, :, :T].to(q.dtype)
    final = [t.reshape(B, H, *t.shape[1:]) for t in out[1:]]
    return y, MemoryState(tuple(final[:depth]), tuple(final[depth:]))


def _kernels():
    """The fused-kernel package (models/kernels/), or None where it is absent: imported by name so that
    the exported Hugging Face modeling file, which bundles this module alone, runs the PyTorch loop."""
    try:
        return importlib.import_module("titans_pretrain.models.kernels")
    except ImportError:
        return None


def _second_derivative(activation: str, z: Tensor) -> Tensor:
    if activation == "gelu":
        pdf = torch.exp(-0.5 * z * z) * (1.0 / (2.0 * torch.pi) ** 0.5)
        return pdf * (2.0 - z * z)
    s = torch.sigmoid(z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


class _DualForm(torch.autograd.Function):
    """The sequential chunk loop of the dual form, with its backward written out.

    Per chunk (layers ``i``; ``a_0 = K``, ``h_0 = Q``; rows are tokens)::

        key path   z_i = a_i W_i,  a_{i+1} = act(z_i),  d_last = 2 (z_last - V),
                   d_i = act'(z_i) * e_i  with  e_i = d_{i+1} W_{i+1}^T
        read       P_i = h_i a_i^T,  x_i = beta (h_i W_i) + f (h_i S_i) - (G * P_i) d_i,  h_{i+1} = act(x_i)
        chunk end  W_i' = be W_i + fe S_i - a_i^T (ge d_i),  S_i' = me S_i - a_i^T (ne d_i)

    Tensors are (B*H)-batched: inputs ``(BH, n_chunks, b, D)``, coefficients ``(BH, n_chunks, ...)``,
    state ``(BH, d_in, d_out)``. Backward walks the chunks in reverse with the activations saved in
    forward (no recomputation), fusing multiply-adds into in-place ``baddbmm_`` (on fresh temporaries), ``addcmul`` and ``vecdot``.
    """

    @staticmethod
    def forward(ctx, activation, depth, q, k, v, beta, f, G, be, fe, me, ge, ne, *state):
        act, backprop = _ACTIVATIONS[activation]
        weights, momentum = list(state[:depth]), list(state[depth:])
        n_chunks = q.shape[1]
        save = any(ctx.needs_input_grad)
        saved, outputs = [], []
        for c in range(n_chunks):
            a, z, d, e, h, x, P = [k[:, c]], [], [], [], [q[:, c]], [], []
            for i in range(depth):
                z.append(torch.bmm(a[i], weights[i]))
                if i < depth - 1:
                    a.append(act(z[i]))
            d_next = 2.0 * (z[-1] - v[:, c])
            d = [d_next]
            for i in range(depth - 2, -1, -1):
                e.insert(0, torch.bmm(d_next, weights[i + 1].transpose(1, 2)))
                d_next = backprop(e[0], z[i])
                d.insert(0, d_next)
            beta_c, f_c, G_c = beta[:, c, :, None], f[:, c, :, None], G[:, c]
            for i in range(depth):
                P.append(torch.bmm(h[i], a[i].transpose(1, 2)))
                base = torch.addcmul(beta_c * torch.bmm(h[i], weights[i]), f_c, torch.bmm(h[i], momentum[i]))
                xi = base.baddbmm_(G_c * P[i], d[i], alpha=-1.0)
                if i < depth - 1:
                    x.append(xi)
                    h.append(act(xi))
            outputs.append(xi)
            if save:
                saved.append((list(weights), list(momentum), a, z, d, e, h, x, P))
            be_c, fe_c, me_c = (t[:, c, None, None] for t in (be, fe, me))
            ge_c, ne_c = ge[:, c, :, None], ne[:, c, :, None]
            for i in range(depth):
                at = a[i].transpose(1, 2)
                new_w = torch.addcmul(be_c * weights[i], fe_c, momentum[i]).baddbmm_(at, ge_c * d[i], alpha=-1.0)
                momentum[i] = (me_c * momentum[i]).baddbmm_(at, ne_c * d[i], alpha=-1.0)
                weights[i] = new_w
        ctx.activation, ctx.depth, ctx.saved = activation, depth, saved
        if save:
            ctx.save_for_backward(beta, f, G, be, fe, me, ge, ne)
        return (torch.stack(outputs, dim=1), *weights, *momentum)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *dstate):
        activation, depth, saved = ctx.activation, ctx.depth, ctx.saved
        _, backprop = _ACTIVATIONS[activation]
        beta, f, G, be, fe, me, ge, ne = ctx.saved_tensors
        n_chunks = len(saved)
        first_w, first_s = saved[0][0], saved[0][1]
        dW = [g.contiguous() if g is not None else torch.zeros_like(w) for g, w in zip(dstate[:depth], first_w)]
        dS = [g.contiguous() if g is not None else torch.zeros_like(s) for g, s in zip(dstate[depth:], first_s)]
        if dy is None:
            dy = beta.new_zeros(*beta.shape, first_w[-1].shape[-1])
        dq, dk, dv = [], [], []
        dbeta, df, dG = torch.zeros_like(beta), torch.zeros_like(f), torch.zeros_like(G)
        dbe, dfe, dme = torch.zeros_like(be), torch.zeros_like(fe), torch.zeros_like(me)
        dge, dne = torch.zeros_like(ge), torch.zeros_like(ne)
        tr = lambda t: t.transpose(1, 2)  # noqa: E731
        vecdot = torch.linalg.vecdot

        for c in range(n_chunks - 1, -1, -1):
            W, S, a, z, d, e, h, x, P = saved[c]
            saved[c] = None  # free as we go
            be_c, fe_c, me_c = (t[:, c, None, None] for t in (be, fe, me))
            ge_c, ne_c = ge[:, c, :, None], ne[:, c, :, None]
            beta_c, f_c, G_c = beta[:, c, :, None], f[:, c, :, None], G[:, c]

            # Chunk end: W' = be W + fe S - a^T (ge d),  S' = me S - a^T (ne d).
            dA, dD, dW_prev, dS_prev = [], [], [], []
            for i in range(depth):
                dbe[:, c] += vecdot(dW[i].flatten(1), W[i].flatten(1))
                dfe[:, c] += vecdot(dW[i].flatten(1), S[i].flatten(1))
                dme[:, c] += vecdot(dS[i].flatten(1), S[i].flatten(1))
                dU_w, dU_s = torch.bmm(a[i], dW[i]), torch.bmm(a[i], dS[i])    # minus d(ge d), d(ne d)
                dge[:, c] -= vecdot(dU_w, d[i])
                dne[:, c] -= vecdot(dU_s, d[i])
                dD.append(torch.addcmul(ge_c * dU_w, ne_c, dU_s).neg_())
                dA.append(torch.bmm(ge_c * d[i], tr(dW[i])).baddbmm_(ne_c * d[i], tr(dS[i])).neg_())
                dW_prev.append(be_c * dW[i])
                dS_prev.append(torch.addcmul(me_c * dS[i], fe_c, dW[i]))

            # Read, last layer first: x_i = beta (h W) + f (h S) - (G * P) d,  P = h a^T.
            dh = dy[:, c]
            for i in range(depth - 1, -1, -1):
                dx = dh if i == depth - 1 else backprop(dh, x[i])
                dhW, dhS = torch.bmm(dx, tr(W[i])), torch.bmm(dx, tr(S[i]))
                dbeta[:, c] += vecdot(dhW, h[i])
                df[:, c] += vecdot(dhS, h[i])
                dW_prev[i] = dW_prev[i].baddbmm_(tr(h[i]), beta_c * dx)
                dS_prev[i] = dS_prev[i].baddbmm_(tr(h[i]), f_c * dx)
                dR = torch.bmm(dx, tr(d[i])).neg_()                            # (b, b)
                dD[i] = dD[i].baddbmm_(tr(G_c * P[i]), dx, alpha=-1.0)
                dG[:, c] += dR * P[i]
                dP = dR * G_c
                dh = torch.addcmul(beta_c * dhW, f_c, dhS).baddbmm_(dP, a[i])
                dA[i] = dA[i].baddbmm_(tr(dP), h[i])
            dq.append(dh)

            # Key path, the delta chain first (d_i = act'(z_i) * e_i, e_i = d_{i+1} W_{i+1}^T) ...
            dz = [None] * depth
            for i in range(depth - 1):
                de = backprop(dD[i], z[i])
                dz[i] = dD[i] * e[i] * _second_derivative(activation, z[i])
                dD[i + 1] = dD[i + 1].baddbmm_(de, W[i + 1])
                dW_prev[i + 1] = dW_prev[i + 1].baddbmm_(tr(de), d[i + 1])
            dz[-1] = 2.0 * dD[-1] if dz[-1] is None else torch.add(dz[-1], dD[-1], alpha=2.0)
            dv.append(-2.0 * dD[-1])
            # ... then the forward chain z_i = a_i W_i, a_{i+1} = act(z_i), in reverse.
            for i in range(depth - 1, -1, -1):
                dA[i] = dA[i].baddbmm_(dz[i], tr(W[i]))
                dW_prev[i] = dW_prev[i].baddbmm_(tr(a[i]), dz[i])
                if i > 0:
                    dz[i - 1] = dz[i - 1] + backprop(dA[i], z[i - 1])
            dk.append(dA[0])
            dW, dS = dW_prev, dS_prev

        ctx.saved = None
        stack = lambda xs: torch.stack(xs[::-1], dim=1)  # noqa: E731
        return (None, None, stack(dq), stack(dk), stack(dv), dbeta, df, dG, dbe, dfe, dme, dge, dne,
                *dW, *dS)
