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

import math
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


def _gelu_grad(z: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def _silu(z: Tensor) -> Tensor:
    return torch.nn.functional.silu(z)


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "gelu": (_gelu, _gelu_grad),
    "silu": (_silu, _silu_grad),
}


def _activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"memory activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ shared pieces
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
    act, act_grad = _activation(activation)
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
        delta = (delta @ weights[i + 1].transpose(-1, -2)) * act_grad(pre_acts[i])
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
    """
    _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size)
    act, _ = _activation(activation)
    dtype = _state_dtype(q.dtype)
    out_dtype = q.dtype
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

    # Padding sits after the last real token: causal coefficients keep it out of every real row.
    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    beta, f, m, G, N = _gate_coefficients(chunks(theta), chunks(eta, 1.0), chunks(alpha))

    weights = [w.to(dtype) for w in state.weights]
    momentum = [s.to(dtype) for s in state.momentum]
    outputs = []
    for c in range(n_chunks):
        last = b - 1 if c < n_chunks - 1 else (T - 1) % b
        beta_c, f_c = beta[:, :, c, :, None], f[:, :, c, :, None]
        G_c = G[:, :, c]
        inputs, deltas = surprise_gradients(kc[:, :, c], vc[:, :, c], weights, activation=activation)

        # Read: layer by layer, a'_t M_t = beta_t a'_t W0 + f_t a'_t S0 - sum_s G_ts (a'_t . a_s) delta_s.
        h = qc[:, :, c]
        for i, (a, d) in enumerate(zip(inputs, deltas)):
            z = beta_c * (h @ weights[i]) + f_c * (h @ momentum[i]) - (G_c * (h @ a.transpose(-1, -2))) @ d
            h = act(z) if i < len(weights) - 1 else z
        outputs.append(h)

        # Chunk end (row `last`): M = beta W0 + f S0 - A^T diag(G_last) D, S = m S0 - A^T diag(N_last) D.
        g_last = G_c[:, :, last, :, None]
        n_last = N[:, :, c, last, :, None]
        beta_e = beta[:, :, c, last, None, None]
        f_e = f[:, :, c, last, None, None]
        m_e = m[:, :, c, last, None, None]
        for i, (a, d) in enumerate(zip(inputs, deltas)):
            at = a.transpose(-1, -2)
            new_w = beta_e * weights[i] + f_e * momentum[i] - at @ (g_last * d)
            momentum[i] = m_e * momentum[i] - at @ (n_last * d)
            weights[i] = new_w

    y = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :T]
    return y.to(out_dtype), MemoryState(tuple(weights), tuple(momentum))
