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


def _block_e(E: int) -> int:
    """Hidden units per tile of the depth-2 kernels: ``TITANS_KERNEL_BLOCK_E`` (a power of two >= 16),
    else 16, at most ``E``. The tile bounds what a program holds at once; at the issue's shape
    (chunk 64, D=64, E=256) 16 is the widest whose backward fits an H100's shared memory
    (``bench/kernel_resources.py``)."""
    block = int(os.environ.get("TITANS_KERNEL_BLOCK_E", 0) or 16)
    if not _pow2_16(block):
        raise ValueError(f"$TITANS_KERNEL_BLOCK_E must be a power of two >= 16, got {block}")
    return min(E, block)


def _num_warps() -> int:
    """``TITANS_KERNEL_NUM_WARPS``, else 4: at the issue's shape 8 warps spill as many registers and
    need more shared memory in forward (``bench/kernel_resources.py --warps 4 8``)."""
    return int(os.environ.get("TITANS_KERNEL_NUM_WARPS", 0) or 4)


def _launch_options(t: Tensor) -> dict:
    """Compiler options on CUDA (the interpreter takes none): one stage (nothing to software-pipeline;
    multi-buffering would only cost shared memory)."""
    return {"num_warps": _num_warps(), "num_stages": 1} if t.is_cuda else {}


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
        f32 = torch.float32
        ins = [t.to(f32).contiguous() for t in (q, k, v, beta, f, G, be, fe, me, ge, ne)]
        save = any(ctx.needs_input_grad)
        n_slots = n + 1 if save else 2  # every chunk-start state for backward, or two to alternate
        slots = []
        for t in state:
            slots.append(q.new_empty(BH, n_slots, *t.shape[1:], dtype=f32))
            slots[-1][:, 0] = t
        opts = _options(q, depth, state[0].shape[-1], activation)
        fwd, bwd = (mod.mlp2_fwd_kernel, mod.mlp2_bwd_kernel) if depth == 2 else (mod.mlp1_fwd_kernel,
                                                                                   mod.mlp1_bwd_kernel)
        y = torch.empty(BH, n, b, D, device=q.device, dtype=f32)
        fwd[(BH,)](*ins, *_kernel_order(slots), y, n, n_slots, BT=b, D=D, **opts)
        if save:
            if q.is_cuda:  # build the backward now, so that a failure to build falls back before autograd
                bwd.warmup(*ins, *_kernel_order(slots), y, *_kernel_order(slots), *ins, n, grid=(BH,),
                           BT=b, D=D, **opts)
            ctx.save_for_backward(*ins, *slots)
        ctx.bwd, ctx.opts = bwd, opts
        return (y, *(s[:, n % n_slots].clone() for s in slots))  # y and the state after the last chunk

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *dstate):
        q, k, v, beta, f, G, be, fe, me, ge, ne, *slots = ctx.saved_tensors
        BH, n, b, D = q.shape
        dy = torch.zeros_like(q) if dy is None else dy.to(torch.float32).contiguous()
        # Two gradient slots per state tensor: slot 0 in (the gradient of the final state); the kernel
        # alternates, and the gradient of the initial state ends in slot n % 2.
        dslots = []
        for g, s in zip(dstate, slots):
            dslots.append(q.new_zeros(BH, 2, *s.shape[2:]))
            if g is not None:
                dslots[-1][:, 0] = g
        grads = [torch.empty_like(t) for t in (q, k, v, beta, f, G, be, fe, me, ge, ne)]
        ctx.bwd[(BH,)](q, k, v, beta, f, G, be, fe, me, ge, ne, *_kernel_order(slots), dy,
                       *_kernel_order(dslots), *grads, n, BT=b, D=D, **ctx.opts)  # as forward ran
        return (None, None, *grads, *(g[:, n % 2] for g in dslots))


def _kernel_order(state):
    """``[*weights, *momentum]`` -> the kernels' order ``W1, S1`` (depth 1) or ``W1, S1, W2, S2``."""
    if len(state) == 4:
        w1, w2, s1, s2 = state
        return w1, s1, w2, s2
    return tuple(state)


def _options(q: Tensor, depth: int, E: int, activation: str) -> dict:
    """The kernels' constexprs and compiler options (depth 1 is linear: no activation, no tiles)."""
    opts = dict(PREC=_precision(q), **_launch_options(q))
    if depth == 2:
        opts.update(E=E, EB=_block_e(E), ACT=_ACT_CODES[activation])
    return opts
