"""The functional core of the Titans neural long-term memory (Behrouz et al. 2024, §3.1-3.2).

The memory of one (sequence, head) is a bias-free MLP ``D -> E -> ... -> E -> D`` whose weights are a
recurrent state. Token ``t`` writes with the surprise ``u_t``, the gradient of ``||M(k_t) - v_t||^2``,
through per-token momentum and forgetting::

    S_t = eta_t S_{t-1} - theta_t u_t          M_t = (1 - alpha_t) M_{t-1} + S_t          y_t = M_t(q_t)

and reads after its own update. With ``surprise_clip = tau > 0`` each token's surprise is first
clipped by its norm, ``u_t <- u_t * min(1, tau / ||u_t||)`` (the Frobenius norm over every layer of
the memory MLP): a per-token scale of ``theta_t``, so the state can move by at most
``theta_max * tau`` per token and cannot run away however large the values or the weights grow
(docs/training.md, "Memory stability"). ``tau = 0`` is the bare rule. Training uses the chunked rule: inside a chunk of ``chunk_size``
tokens every ``u_t`` is taken at the chunk-start weights. Two implementations of that one rule:

* :func:`memory_recurrent` walks token by token, materialising the weights after every token. It is
  slow and obviously right: the reference.
* :func:`memory_chunked` is the dual form (docs/method.md §2): per chunk, the key-path forward and
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
    "surprise_clip_scale",
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


def surprise_clip_scale(inputs: Sequence[Tensor], deltas: Sequence[Tensor], clip: float) -> tuple[Tensor, Tensor]:
    """Per-token clip factor ``c = min(1, clip / ||u||)`` and ``||u||^2``, both ``(..., T, 1)``.

    Token ``t``'s surprise is ``u_i = a_i^T delta_i`` for every layer ``i``: rank-1, so
    ``||u||^2 = sum_i ||a_i||^2 ||delta_i||^2`` without forming it. ``c`` is differentiable
    (``clip * rsqrt(max(||u||^2, clip^2))``: 1 with zero gradient below the threshold, and no
    ``0 * inf`` at ``u = 0``).
    """
    r2 = sum((a * a).sum(-1, keepdim=True) * (d * d).sum(-1, keepdim=True) for a, d in zip(inputs, deltas))
    return clip * torch.rsqrt(r2.clamp_min(clip * clip)), r2


def _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size, surprise_clip):
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
    if not 0 <= surprise_clip < 1e18:  # also refuses NaN and inf (its square must stay finite in fp32)
        raise ValueError(f"surprise_clip must be a finite number >= 0 (0 = the bare rule), got {surprise_clip}")


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
    surprise_clip: float = 0.0,
) -> tuple[Tensor, MemoryState]:
    """Token-by-token reference of :func:`memory_chunked` (same signature and semantics).

    Materialises the weights after every token: ``O(T)`` sequential steps, for tests only. The clip
    is plain autograd here (:func:`surprise_clip_scale`), the oracle of the dual form's hand-written
    backward through it.
    """
    _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size, surprise_clip)
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
        if surprise_clip:
            scale, _ = surprise_clip_scale(inputs, deltas, surprise_clip)
            deltas = [d * scale for d in deltas]
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
    surprise_clip: float = 0.0,
    state_interval: int = 1,
) -> tuple[Tensor, MemoryState]:
    """Run the memory over ``T`` tokens in the chunked dual form; return ``(y, final_state)``.

    ``q, k, v``: ``(B, H, T, D)``; ``theta`` (already scaled by ``theta_max``), ``eta``, ``alpha``:
    ``(B, H, T)``; ``state``: the memory before token 0. Token ``t``'s gradient is taken at the
    weights of its chunk start (chunks of ``chunk_size`` from ``t = 0``; the last may be shorter),
    ``y_t = M_t(q_t)`` reads the memory after token ``t``'s own update, and the returned state is the
    one after the last token. ``y`` has ``q``'s dtype; all state arithmetic is fp32 (fp64 for fp64).
    ``surprise_clip`` (``tau``): clip every token's surprise to norm ``tau`` (0 = the bare rule).
    ``state_interval`` (``k``): keep for backward the chunk-start state of every ``k``-th chunk and
    recompute the rest in backward (the same numbers for any ``k``; memory against time).

    The chunk loop has a hand-written backward (:class:`_DualForm`): one pass back over the chunks,
    no autograd graph of thousands of small nodes, and everything it keeps goes through
    ``save_for_backward``, so activation checkpointing frees it. The gate
    coefficients are built outside it, so autograd carries their gradients back to the gates. On
    CUDA the loop runs as fused Triton kernels when the shape allows (:mod:`.kernels`; force either
    path with ``TITANS_MEMORY_KERNEL=torch|triton`` or ``kernels.memory_kernel(...)``).
    """
    _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size, surprise_clip)
    _activation(activation)
    if not (isinstance(state_interval, int) and state_interval >= 1):
        raise ValueError(f"state_interval must be an integer >= 1 (1 keeps every chunk-start state), got "
                         f"{state_interval!r}")
    clip = float(surprise_clip)
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
    out = loop(activation, depth, clip, state_interval, *(flat(chunks(x)) for x in (q, k, v)),
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


class _Chunk(NamedTuple):
    """One chunk's inputs, as views into the loop's (B*H)-batched tensors: ``q, k, v`` ``(BH, b, D)``,
    the read coefficients ``beta, f`` ``(BH, b, 1)`` and ``G`` ``(BH, b, b)``, the chunk-end
    coefficients ``be, fe, me`` ``(BH, 1, 1)`` and ``ge, ne`` ``(BH, b, 1)``."""

    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    f: Tensor
    G: Tensor
    be: Tensor
    fe: Tensor
    me: Tensor
    ge: Tensor
    ne: Tensor

    @staticmethod
    def at(c: int, q, k, v, beta, f, G, be, fe, me, ge, ne) -> "_Chunk":
        return _Chunk(q[:, c], k[:, c], v[:, c], beta[:, c, :, None], f[:, c, :, None], G[:, c],
                      *(t[:, c, None, None] for t in (be, fe, me)), ge[:, c, :, None], ne[:, c, :, None])


def _chunk_forward(activation: str, clip: float, x: _Chunk, weights: list[Tensor], momentum: list[Tensor],
                   keep: bool):
    """One chunk of :class:`_DualForm`: ``(read, weights after, momentum after, activations)``, the
    activations (``a, z, d, e, h, x, P, scale, r2``) only when ``keep``."""
    act, backprop = _ACTIVATIONS[activation]
    depth = len(weights)
    a, z, e, h, xs, P = [x.k], [], [], [x.q], [], []
    for i in range(depth):
        z.append(torch.bmm(a[i], weights[i]))
        if i < depth - 1:
            a.append(act(z[i]))
    d_next = 2.0 * (z[-1] - x.v)
    d = [d_next]
    for i in range(depth - 2, -1, -1):
        e.insert(0, torch.bmm(d_next, weights[i + 1].transpose(1, 2)))
        d_next = backprop(e[0], z[i])
        d.insert(0, d_next)
    scale = r2 = None
    w = d
    if clip:
        scale, r2 = surprise_clip_scale(a, d, clip)
        w = [scale * di for di in d]
    for i in range(depth):
        P.append(torch.bmm(h[i], a[i].transpose(1, 2)))
        base = torch.addcmul(x.beta * torch.bmm(h[i], weights[i]), x.f, torch.bmm(h[i], momentum[i]))
        xi = base.baddbmm_(x.G * P[i], w[i], alpha=-1.0)
        if i < depth - 1:
            xs.append(xi)
            h.append(act(xi))
    new_w, new_s = [], []
    for i in range(depth):
        at = a[i].transpose(1, 2)
        new_w.append(torch.addcmul(x.be * weights[i], x.fe, momentum[i]).baddbmm_(at, x.ge * w[i], alpha=-1.0))
        new_s.append((x.me * momentum[i]).baddbmm_(at, x.ne * w[i], alpha=-1.0))
    saved = (a, z, d, e, h, xs, P, scale, r2) if keep else None
    return xi, new_w, new_s, saved


class _DualForm(torch.autograd.Function):
    """The sequential chunk loop of the dual form, with its backward written out.

    Per chunk (layers ``i``; ``a_0 = K``, ``h_0 = Q``; rows are tokens)::

        key path   z_i = a_i W_i,  a_{i+1} = act(z_i),  d_last = 2 (z_last - V),
                   d_i = act'(z_i) * e_i  with  e_i = d_{i+1} W_{i+1}^T
        clip       w_i = c * d_i,  c = min(1, clip / ||u||),  ||u||^2 = sum_i |a_i|^2 |d_i|^2   (per row)
        read       P_i = h_i a_i^T,  x_i = beta (h_i W_i) + f (h_i S_i) - (G * P_i) w_i,  h_{i+1} = act(x_i)
        chunk end  W_i' = be W_i + fe S_i - a_i^T (ge w_i),  S_i' = me S_i - a_i^T (ne w_i)

    Without the clip (``clip = 0``) ``w_i = d_i``. Tensors are (B*H)-batched: inputs
    ``(BH, n_chunks, b, D)``, coefficients ``(BH, n_chunks, ...)``, state ``(BH, d_in, d_out)``.

    What is kept for backward goes through ``save_for_backward`` (so that activation checkpointing
    frees it with the rest of the block): the inputs and the chunk-start state of every
    ``interval``-th chunk. Backward walks those segments in reverse: it recomputes a segment's chunks
    forward from its saved state, keeping their activations, then runs back through them, fusing
    multiply-adds into in-place ``baddbmm_`` (on fresh temporaries), ``addcmul`` and ``vecdot``. The
    recomputed chunks repeat the forward's operations exactly, so the gradients do not depend on
    ``interval``; its cost is ``interval`` chunk states per segment instead of one per chunk held
    from forward to backward, for one more forward of the chunk loop in backward.
    """

    @staticmethod
    def forward(ctx, activation, depth, clip, interval, q, k, v, beta, f, G, be, fe, me, ge, ne, *state):
        weights, momentum = list(state[:depth]), list(state[depth:])
        n_chunks = q.shape[1]
        inputs = (q, k, v, beta, f, G, be, fe, me, ge, ne)
        save = any(ctx.needs_input_grad)
        kept = [t.new_empty(t.shape[0], -(-n_chunks // interval), *t.shape[1:]) for t in state] if save else []
        outputs = []
        for c in range(n_chunks):
            if save and c % interval == 0:
                for buf, t in zip(kept, (*weights, *momentum)):
                    buf[:, c // interval] = t
            y, weights, momentum, _ = _chunk_forward(activation, clip, _Chunk.at(c, *inputs), weights, momentum,
                                                     keep=False)
            outputs.append(y)
        ctx.activation, ctx.depth, ctx.clip, ctx.interval = activation, depth, clip, interval
        if save:
            ctx.save_for_backward(*inputs, *kept)
        return (torch.stack(outputs, dim=1), *weights, *momentum)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *dstate):
        depth, interval = ctx.depth, ctx.interval
        saved = ctx.saved_tensors  # once: under activation checkpointing a second unpack is an error
        inputs, kept = saved[:11], saved[11:]
        q, k, v, beta, f, G, be, fe, me, ge, ne = inputs
        n_chunks = q.shape[1]
        dW = [g.contiguous() if g is not None else torch.zeros_like(s[:, 0]) for g, s in zip(dstate[:depth], kept)]
        dS = [g.contiguous() if g is not None else torch.zeros_like(s[:, 0]) for g, s in zip(dstate[depth:], kept[depth:])]
        if dy is None:
            dy = beta.new_zeros(*beta.shape, kept[depth - 1].shape[-1])
        grads = _ChunkGrads.zeros(q, k, v, beta, f, G, be, fe, me, ge, ne)
        for start in range(-(-n_chunks // interval) * interval - interval, -1, -interval):
            weights = [s[:, start // interval] for s in kept[:depth]]
            momentum = [s[:, start // interval] for s in kept[depth:]]
            segment = []
            for c in range(start, min(start + interval, n_chunks)):  # recompute, keeping activations
                x = _Chunk.at(c, *inputs)
                _, new_w, new_s, saved = _chunk_forward(ctx.activation, ctx.clip, x, weights, momentum, keep=True)
                segment.append((c, x, weights, momentum, saved))
                weights, momentum = new_w, new_s
            for c, x, weights, momentum, saved in reversed(segment):
                dW, dS = _chunk_backward(ctx.activation, ctx.clip, c, x, weights, momentum, saved, dy[:, c],
                                         dW, dS, grads)
        return (None, None, None, None, *grads.stacked(), *dW, *dS)


class _ChunkGrads:
    """The gradients of :class:`_DualForm`'s inputs, filled chunk by chunk in reverse."""

    def __init__(self, dq, dk, dv, dbeta, df, dG, dbe, dfe, dme, dge, dne):
        self.dq, self.dk, self.dv = dq, dk, dv
        self.dbeta, self.df, self.dG, self.dbe, self.dfe, self.dme, self.dge, self.dne = (
            dbeta, df, dG, dbe, dfe, dme, dge, dne)

    @staticmethod
    def zeros(*inputs) -> "_ChunkGrads":
        return _ChunkGrads(*(torch.zeros_like(t) for t in inputs))

    def stacked(self):
        return (self.dq, self.dk, self.dv, self.dbeta, self.df, self.dG, self.dbe, self.dfe, self.dme, self.dge,
                self.dne)


def _chunk_backward(activation: str, clip: float, c: int, x: _Chunk, W: list[Tensor], S: list[Tensor], saved,
                    dy: Tensor, dW: list[Tensor], dS: list[Tensor], g: _ChunkGrads):
    """Back through chunk ``c`` (its start state ``W, S`` and activations ``saved``), given the
    gradients of its read ``dy`` and of its end state ``dW, dS``: fills row ``c`` of ``g`` and returns
    the gradients of its start state."""
    _, backprop = _ACTIVATIONS[activation]
    depth = len(W)
    a, z, d, e, h, xs, P, scale, r2 = saved
    tr = lambda t: t.transpose(1, 2)  # noqa: E731
    vecdot = torch.linalg.vecdot
    w = d if scale is None else [scale * di for di in d]   # the write deltas

    # Chunk end: W' = be W + fe S - a^T (ge w),  S' = me S - a^T (ne w). dD is d/dw until the clip.
    dA, dD, dW_prev, dS_prev = [], [], [], []
    for i in range(depth):
        g.dbe[:, c] += vecdot(dW[i].flatten(1), W[i].flatten(1))
        g.dfe[:, c] += vecdot(dW[i].flatten(1), S[i].flatten(1))
        g.dme[:, c] += vecdot(dS[i].flatten(1), S[i].flatten(1))
        dU_w, dU_s = torch.bmm(a[i], dW[i]), torch.bmm(a[i], dS[i])    # minus d(ge w), d(ne w)
        g.dge[:, c] -= vecdot(dU_w, w[i])
        g.dne[:, c] -= vecdot(dU_s, w[i])
        dD.append(torch.addcmul(x.ge * dU_w, x.ne, dU_s).neg_())
        dA.append(torch.bmm(x.ge * w[i], tr(dW[i])).baddbmm_(x.ne * w[i], tr(dS[i])).neg_())
        dW_prev.append(x.be * dW[i])
        dS_prev.append(torch.addcmul(x.me * dS[i], x.fe, dW[i]))

    # Read, last layer first: x_i = beta (h W) + f (h S) - (G * P) w,  P = h a^T.
    dh = dy
    for i in range(depth - 1, -1, -1):
        dx = dh if i == depth - 1 else backprop(dh, xs[i])
        dhW, dhS = torch.bmm(dx, tr(W[i])), torch.bmm(dx, tr(S[i]))
        g.dbeta[:, c] += vecdot(dhW, h[i])
        g.df[:, c] += vecdot(dhS, h[i])
        dW_prev[i] = dW_prev[i].baddbmm_(tr(h[i]), x.beta * dx)
        dS_prev[i] = dS_prev[i].baddbmm_(tr(h[i]), x.f * dx)
        dR = torch.bmm(dx, tr(w[i])).neg_()                            # (b, b)
        dD[i] = dD[i].baddbmm_(tr(x.G * P[i]), dx, alpha=-1.0)
        g.dG[:, c] += dR * P[i]
        dP = dR * x.G
        dh = torch.addcmul(x.beta * dhW, x.f, dhS).baddbmm_(dP, a[i])
        dA[i] = dA[i].baddbmm_(tr(dP), h[i])
    g.dq[:, c] = dh

    # Clip, w_i = c d_i with c = clip / ||u|| above the threshold: d/dd_i = c d/dw_i + g |a_i|^2 d_i
    # and d/da_i += g |d_i|^2 a_i, where g = -(dL/dc) c / ||u||^2 (0 below the threshold).
    if scale is not None:
        dscale = sum(vecdot(dD[i], d[i]) for i in range(depth)).unsqueeze(-1)
        gc = torch.where(r2 > clip * clip, -dscale * scale / r2.clamp_min(clip * clip), 0.0)
        for i in range(depth):
            dD[i] = torch.addcmul(dD[i] * scale, gc * (a[i] * a[i]).sum(-1, keepdim=True), d[i])
            dA[i] = torch.addcmul(dA[i], gc * (d[i] * d[i]).sum(-1, keepdim=True), a[i])

    # Key path, the delta chain first (d_i = act'(z_i) * e_i, e_i = d_{i+1} W_{i+1}^T) ...
    dz = [None] * depth
    for i in range(depth - 1):
        de = backprop(dD[i], z[i])
        dz[i] = dD[i] * e[i] * _second_derivative(activation, z[i])
        dD[i + 1] = dD[i + 1].baddbmm_(de, W[i + 1])
        dW_prev[i + 1] = dW_prev[i + 1].baddbmm_(tr(de), d[i + 1])
    dz[-1] = 2.0 * dD[-1] if dz[-1] is None else torch.add(dz[-1], dD[-1], alpha=2.0)
    g.dv[:, c] = -2.0 * dD[-1]
    # ... then the forward chain z_i = a_i W_i, a_{i+1} = act(z_i), in reverse.
    for i in range(depth - 1, -1, -1):
        dA[i] = dA[i].baddbmm_(dz[i], tr(W[i]))
        dW_prev[i] = dW_prev[i].baddbmm_(tr(a[i]), dz[i])
        if i > 0:
            dz[i - 1] = dz[i - 1] + backprop(dA[i], z[i - 1])
    g.dk[:, c] = dA[0]
    return dW_prev, dS_prev
