"""Fused Triton kernels for the chunked memory, and the choice between them and the PyTorch path.

:func:`titans_pretrain.models.memory_ops.memory_chunked` asks :func:`use_triton` whether to run its
chunk loop (the dual form) with :class:`TritonDualForm` instead of the PyTorch ``_DualForm``; both take
and return the same tensors, so everything around the loop (gate coefficients, padding, dtypes) is
shared. The choice, in order:

1. :func:`memory_kernel` (a context manager) if one is active, else
2. the environment variable ``TITANS_MEMORY_KERNEL``, else ``auto``.

``auto`` picks Triton on CUDA when triton imports and the shape is supported, PyTorch otherwise.
``triton`` forces the kernel (an error naming the reason if the shape is unsupported; on CPU it runs
under Triton's interpreter, slowly: for tests). ``torch`` forces the PyTorch path.

Supported: depth 1 or 2, gelu or silu, state fp32 (not fp64), ``chunk`` (the effective chunk
``min(chunk_size, T)``), ``D`` and the hidden width ``E`` powers of two >= 16.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

import torch
from torch import Tensor

__all__ = ["MODES", "TritonDualForm", "apply_dual_form", "memory_kernel", "kernel_mode", "triton_available",
           "unsupported_reason", "use_triton"]

MODES = ("auto", "triton", "torch")
ENV_VAR = "TITANS_MEMORY_KERNEL"
_ACT_CODES = {"gelu": 0, "silu": 1}
_local = threading.local()


@contextlib.contextmanager
def memory_kernel(mode: str):
    """Force the chunk-loop implementation inside the block: ``"auto"``, ``"triton"`` or ``"torch"``."""
    _check_mode(mode, "memory_kernel(mode)")
    previous = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = previous


def _check_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where} must be one of {MODES}, got {mode!r}")
    return mode


def kernel_mode() -> str:
    """The active mode: the innermost :func:`memory_kernel`, else ``$TITANS_MEMORY_KERNEL``, else auto."""
    mode = getattr(_local, "mode", None)
    if mode is not None:
        return mode
    return _check_mode(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _pow2_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def unsupported_reason(depth: int, activation: str, dtype: torch.dtype, chunk: int, dims) -> str | None:
    """Why the kernel cannot run this configuration (``None`` when it can)."""
    if depth not in (1, 2):
        return f"memory depth {depth} (the kernel handles depth 1 and 2)"
    if activation not in _ACT_CODES:
        return f"activation {activation!r} (the kernel handles {sorted(_ACT_CODES)})"
    if dtype != torch.float32:
        return f"state dtype {dtype} (the kernel keeps fp32 state; fp64 runs on the PyTorch path)"
    sizes = dict(dims)
    if sizes.get("D_out", sizes.get("D")) != sizes.get("D"):
        return f"value dimension {sizes['D_out']} != key dimension {sizes['D']} (the kernel needs them equal)"
    for name, n in (("chunk (min(chunk_size, T))", chunk), *dims):
        if not _pow2_16(n):
            return f"{name} = {n} (the kernel needs powers of two >= 16)"
    return None


def use_triton(device: torch.device, depth: int, activation: str, dtype: torch.dtype, chunk: int, dims) -> bool:
    """Whether :func:`memory_chunked` should run its chunk loop with :class:`TritonDualForm`."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    reason = unsupported_reason(depth, activation, dtype, chunk, dims)
    if mode == "auto":
        return (device.type == "cuda" and reason is None and triton_available()
                and _config_key(depth, activation, chunk, dims) not in _FAILED)
    if reason is not None:
        raise ValueError(f"the Triton memory kernel was forced ({ENV_VAR} or memory_kernel('triton')) but "
                         f"cannot run {reason}; use mode 'auto' or 'torch' for this configuration")
    if not triton_available():
        raise ImportError(f"the Triton memory kernel was forced but triton is not installed: "
                          f"pip install 'titans-pretrain[gpu]' (or unset {ENV_VAR})")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton memory kernel runs on cuda (or cpu, interpreted); got {device.type}")
    _kernels(device.type)  # fails now, with the fix, if CPU lacks the interpreter
    return True


# Configurations whose kernel failed to build on this machine (auto mode then uses PyTorch): key -> error.
_FAILED: dict[tuple, str] = {}


def _config_key(depth, activation, chunk, dims) -> tuple:
    return depth, activation, chunk, tuple(n for _, n in dims)


def apply_dual_form(fallback, activation: str, depth: int, *args):
    """``TritonDualForm.apply(...)``; in auto mode a kernel that cannot be built for this shape on this
    card (out of shared memory or registers, a compiler error) warns once and runs ``fallback``
    (``memory_ops._DualForm``) instead, now and for every later call with the same configuration."""
    try:
        return TritonDualForm.apply(activation, depth, *args)
    except Exception as err:
        import triton

        if kernel_mode() != "auto" or not isinstance(err, triton.TritonError):
            raise
        q, state = args[0], args[11:]
        dims = [("D", q.shape[-1])] + [("E", w.shape[-1]) for w in state[: depth - 1]] + [("D_out", q.shape[-1])]
        _FAILED[_config_key(depth, activation, q.shape[2], dims)] = repr(err)
        warnings.warn(f"the Triton memory kernel failed to build for depth={depth}, {activation}, chunk="
                      f"{q.shape[2]}, {dims} on this device ({err!r}); using the PyTorch path for this "
                      f"configuration. Set {ENV_VAR}=torch to silence, or report it.", RuntimeWarning)
        return fallback.apply(activation, depth, *args)


def _interpreter_active() -> bool:
    """Triton's interpreter is usable only if TRITON_INTERPRET=1 was set before triton was imported
    (its own library functions, ``tl.sum`` and the like, are decorated at import)."""
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def _kernels(device_type: str):
    """The kernel module: compiled on CUDA, interpreted (numpy) on CPU."""
    from . import dual_form

    if device_type != "cuda" and not _interpreter_active():
        raise RuntimeError("the Triton memory kernel on CPU runs only under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported (or use mode 'torch' on CPU)")
    return dual_form


def _launch_options(t: Tensor, D: int, E: int) -> dict:
    """Compiler options on CUDA (the interpreter takes none): more warps for the big state tiles,
    one stage (nothing to software-pipeline; multi-buffering would only cost shared memory)."""
    if not t.is_cuda:
        return {}
    warps = int(os.environ.get("TITANS_KERNEL_NUM_WARPS", 0)) or (8 if D * E >= 64 * 128 else 4)  # tuning knob
    return {"num_warps": warps, "num_stages": 1}


def _precision(t: Tensor) -> str:
    """TF32 on CUDA when PyTorch's fp32 matmuls use it too; exact fp32 otherwise."""
    if t.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


class TritonDualForm(torch.autograd.Function):
    """Drop-in for ``memory_ops._DualForm``: same arguments, same outputs, fused Triton kernels.

    Arguments: ``activation, depth, q, k, v`` (``(BH, n, b, D)``), the coefficients
    ``beta, f, G, be, fe, me, ge, ne`` (``(BH, n, ...)``), then ``depth`` weights and ``depth``
    momenta (``(BH, d_in, d_out)``). Returns ``(y (BH, n, b, D), *weights, *momentum)``.
    """

    @staticmethod
    def forward(ctx, activation, depth, q, k, v, beta, f, G, be, fe, me, ge, ne, *state):
        mod = _kernels(q.device.type)
        BH, n, b, D = q.shape
        E = state[0].shape[-1] if depth == 2 else D
        f32 = torch.float32
        ins = [t.to(f32).contiguous() for t in (q, k, v, beta, f, G, be, fe, me, ge, ne)]
        w = [t.to(f32).contiguous() for t in state]
        w1, s1 = w[0], w[depth]
        w2, s2 = (w[1], w[3]) if depth == 2 else (w1, s1)
        save = any(ctx.needs_input_grad)
        n_saved = n + 1 if save else 1
        saved = [q.new_empty(BH, n_saved, *t.shape[1:], dtype=f32) for t in (w1, s1, w2, s2)]
        if depth == 1:
            saved[2], saved[3] = saved[0], saved[1]  # dummies, never written
        y = torch.empty(BH, n, b, D, device=q.device, dtype=f32)
        mod.dual_form_fwd_kernel[(BH,)](
            *ins, w1, s1, w2, s2, y, *saved, n, n_saved,
            BT=b, D=D, E=E, DEPTH=depth, ACT=_ACT_CODES[activation], PREC=_precision(q), SAVE=save,
            **_launch_options(q, D, E))
        if save:
            if q.is_cuda:  # build the backward now, so that a failure to build falls back before autograd
                mod.dual_form_bwd_kernel.warmup(
                    *ins, *saved, y, w1, s1, w2, s2, *ins, n, grid=(BH,), BT=b, D=D, E=E, DEPTH=depth,
                    ACT=_ACT_CODES[activation], PREC=_precision(q), **_launch_options(q, D, E))
            ctx.save_for_backward(*ins, *saved)
        ctx.activation, ctx.depth, ctx.dims, ctx.prec = activation, depth, (BH, n, b, D, E), _precision(q)
        w1f, s1f, w2f, s2f = (t[:, -1].clone() for t in saved)  # the state after the last chunk
        weights, momentum = ([w1f, w2f], [s1f, s2f]) if depth == 2 else ([w1f], [s1f])
        return (y, *weights, *momentum)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *dstate):
        q, k, v, beta, f, G, be, fe, me, ge, ne, *saved = ctx.saved_tensors
        depth, (BH, n, b, D, E) = ctx.depth, ctx.dims
        mod = _kernels(q.device.type)
        dy = torch.zeros_like(q) if dy is None else dy.to(torch.float32).contiguous()
        shapes = [(BH, D, E), (BH, E, D)] if depth == 2 else [(BH, D, D)]
        dW = [g.to(torch.float32).contiguous().clone() if g is not None else q.new_zeros(s)
              for g, s in zip(dstate[:depth], shapes)]
        dS = [g.to(torch.float32).contiguous().clone() if g is not None else q.new_zeros(s)
              for g, s in zip(dstate[depth:], shapes)]
        dw1, ds1 = dW[0], dS[0]
        dw2, ds2 = (dW[1], dS[1]) if depth == 2 else (dw1, ds1)
        grads = [torch.empty_like(t) for t in (q, k, v, beta, f, G, be, fe, me, ge, ne)]
        mod.dual_form_bwd_kernel[(BH,)](
            q, k, v, beta, f, G, be, fe, me, ge, ne, *saved, dy, dw1, ds1, dw2, ds2, *grads, n,
            BT=b, D=D, E=E, DEPTH=depth, ACT=_ACT_CODES[ctx.activation], PREC=ctx.prec,  # recompute as forward did
            **_launch_options(q, D, E))
        return (None, None, *grads, *dW, *dS)
