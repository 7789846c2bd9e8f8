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

Supported: depth 1 or 2, gelu or silu, state fp32 (not fp64); ``chunk`` (the effective chunk
``min(chunk_size, T)``) a power of two >= 16; the head dimension ``D`` a multiple of 16 (the kernels pad
it to the next power of two, ``DP``, with zeros, and compute at that width); the hidden width ``E`` a
multiple of 16 (walked in tiles of :func:`_block_e`).
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
    if not _pow2_16(chunk):
        return (f"chunk (min(chunk_size, T)) = {chunk} (the kernel needs a power of two >= 16: the chunk is a "
                f"model choice, TitansConfig.chunk_size, and the kernel cannot pad it without changing the math)")
    for name, n in dims:
        if n < 16 or n % 16:
            what = "head dimension" if name.startswith("D") else "hidden width"
            return f"{what} {name} = {n} (the kernel needs a multiple of 16, >= 16)"
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


def apply_dual_form(fallback, activation: str, depth: int, clip: float, interval: int, *args):
    """``TritonDualForm.apply(...)``; in auto mode a kernel that cannot be built for this shape on this
    card (out of shared memory or registers, a compiler error) warns once and runs ``fallback``
    (``memory_ops._DualForm``) instead, now and for every later call with the same configuration."""
    try:
        return TritonDualForm.apply(activation, depth, clip, interval, *args)
    except Exception as err:
        import triton

        if kernel_mode() != "auto" or not isinstance(err, triton.TritonError):
            raise
        q, state = args[0], args[11:]  # args: q, k, v, 8 coefficients, state
        dims = [("D", q.shape[-1])] + [("E", w.shape[-1]) for w in state[: depth - 1]] + [("D_out", q.shape[-1])]
        _FAILED[_config_key(depth, activation, q.shape[2], dims)] = repr(err)
        warnings.warn(f"the Triton memory kernel failed to build for depth={depth}, {activation}, chunk="
                      f"{q.shape[2]}, {dims} on this device ({err!r}); using the PyTorch path for this "
                      f"configuration. Set {ENV_VAR}=torch to silence, or report it.", RuntimeWarning)
        return fallback.apply(activation, depth, clip, interval, *args)


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
    if device_type != "cuda":
        _interpreter_index_compat()
    return dual_form


def _interpreter_index_compat() -> None:
    """Version compatibility, no change to the math: Triton 3.6's interpreter turns a scalar argument
    into an int (``range(0, n_chunks)`` in the kernels) with ``int(data)`` on a shape-``(1,)`` array,
    which recent NumPy (2.4.6 here) rejects ("only 0-dimensional arrays can be converted to Python scalars");
    later Triton (3.9) does ``int(data.squeeze())``. Where NumPy rejects it and this Triton's
    interpreter lacks the squeeze, wrap its tensor patching to install the later ``__index__``."""
    import inspect

    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.zeros(1))
        return  # this NumPy still converts size-1 arrays
    except TypeError:
        pass
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_squeeze_index", False) or "squeeze" in inspect.getsource(patch):
        return

    def patch_lang_tensor(tensor, scope, *rest):
        patch(tensor, scope, *rest)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._squeeze_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _block_e(E: int) -> int:
    """Hidden units per tile of the depth-2 kernels: ``TITANS_KERNEL_BLOCK_E`` (a power of two >= 16),
    else 16, halved until it divides ``E`` (a multiple of 16: ``E = 384`` is 24 tiles of 16). The tile
    bounds what a program holds at once; 16 keeps the backward well inside an H100's shared memory at
    every shipped preset (``tools/kernel_resources.py``)."""
    block = int(os.environ.get("TITANS_KERNEL_BLOCK_E", 0) or 16)
    if not _pow2_16(block):
        raise ValueError(f"$TITANS_KERNEL_BLOCK_E must be a power of two >= 16, got {block}")
    while E % block and block > 16:
        block //= 2
    return block


def _padded(D: int) -> int:
    """The kernels' block width for a head dimension ``D``: the next power of two (``tl.arange`` and
    ``tl.dot`` need power-of-two blocks), at least 16. Rows and columns past ``D`` are loaded as zeros
    and never stored, which leaves the math exact: padded key, query and value columns are zero, so
    are the padded rows and columns of every weight, momentum and gradient (they stay zero), and
    nothing divides by ``D``."""
    return max(16, 1 << (D - 1).bit_length())



def _num_warps() -> int:
    """``TITANS_KERNEL_NUM_WARPS``, else 4: at the 170M shape 8 warps spill as many registers and
    need more shared memory in forward (``tools/kernel_resources.py --warps 4 8``)."""
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

    Arguments: ``activation, depth, clip, interval, q, k, v`` (``(BH, n, b, D)``), the coefficients
    ``beta, f, G, be, fe, me, ge, ne`` (``(BH, n, ...)``), then ``depth`` weights and ``depth``
    momenta (``(BH, d_in, d_out)``). Returns ``(y (BH, n, b, D), *weights, *momentum)``.

    ``interval`` 1 runs each kernel once and keeps every chunk-start state (slots ``0..n``) for
    backward. ``interval`` k > 1 keeps the start state of every k-th chunk: forward runs segment by
    segment of k chunks (two alternating slots each), and backward, per segment in reverse, first
    re-runs the forward kernel from the kept state to rebuild the segment's k + 1 slots (without the
    read), then runs the backward kernel over them.
    """

    @staticmethod
    def forward(ctx, activation, depth, clip, interval, q, k, v, beta, f, G, be, fe, me, ge, ne, *state):
        mod = _kernels(q.device.type)
        BH, n, b, D = q.shape
        f32 = torch.float32
        ins = [t.to(f32).contiguous() for t in (q, k, v, beta, f, G, be, fe, me, ge, ne)]
        save = any(ctx.needs_input_grad)
        opts = _options(q, depth, state[0].shape[-1], activation, clip)
        fwd, bwd = (mod.mlp2_fwd_kernel, mod.mlp2_bwd_kernel) if depth == 2 else (mod.mlp1_fwd_kernel,
                                                                                   mod.mlp1_bwd_kernel)
        y = torch.empty(BH, n, b, D, device=q.device, dtype=f32)
        every = save and interval == 1
        n_slots = n + 1 if every else 2  # every chunk-start state for backward, or two to alternate
        slots = _slots(state, n_slots)
        kept = [s.new_empty(BH, -(-n // interval), *s.shape[2:]) for s in slots] if save and not every else []
        step = n if every or not save else interval
        for j, c0 in enumerate(range(0, n, step)):
            for buf, s in zip(kept, slots):
                buf[:, j] = s[:, 0]
            n_run = min(step, n - c0)
            fwd[(BH,)](*ins, *_kernel_order(slots), y, n, n_slots, clip, c0, n_run, BT=b, D=D, STORE_Y=True,
                       **opts)
            if not every and n_run % 2:  # the segment's end state is in slot 1: the next one starts from 0
                for s in slots:
                    s[:, 0] = s[:, 1]
        final = [s[:, n if every else 0].clone() for s in slots]
        if save:
            if q.is_cuda:  # build the backward now, so that a failure to build falls back before autograd
                # (y stands in for the depth-2 backward's scratch: building needs only its dtype, alignment)
                bwd.warmup(*ins, *_kernel_order(slots), y, *_kernel_order(slots), *ins, *([y] if depth == 2 else []),
                           n, n_slots, clip, 0, n, grid=(BH,), BT=b, D=D, **opts)
            ctx.save_for_backward(*ins, *(slots if every else kept))
        ctx.fwd, ctx.bwd, ctx.opts, ctx.clip, ctx.interval = fwd, bwd, opts, clip, (1 if every else interval)
        ctx.depth = depth
        return (y, *final)  # y and the state after the last chunk

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *dstate):
        saved = ctx.saved_tensors  # once: under activation checkpointing a second unpack is an error
        ins, kept = saved[:11], saved[11:]
        q = ins[0]
        BH, n, b, D = q.shape
        K = ctx.interval
        dy = torch.zeros_like(q) if dy is None else dy.to(torch.float32).contiguous()
        # Two gradient slots per state tensor: slot 0 in (the gradient of the final state); the kernel
        # alternates, and the gradient of the run's start state ends in slot n_run % 2.
        dslots = []
        for g, s in zip(dstate, kept):
            dslots.append(q.new_zeros(BH, 2, *s.shape[2:]))
            if g is not None:
                dslots[-1][:, 0] = g
        grads = [torch.empty_like(t) for t in ins]
        scratch = _bwd_scratch(q, ctx.depth, ctx.opts)
        if K == 1:  # every chunk-start state is kept: one run over all chunks
            segment, K = kept, n
        else:
            segment = [s.new_empty(BH, K + 1, *s.shape[2:]) for s in kept]
        for c0 in range(((n - 1) // K) * K, -1, -K):
            n_run = min(K, n - c0)
            if segment is not kept:  # rebuild the segment's chunk-start states from the kept one
                for buf, s in zip(segment, kept):
                    buf[:, 0] = s[:, c0 // K]
                ctx.fwd[(BH,)](*ins, *_kernel_order(segment), dy, n, K + 1, ctx.clip, c0, n_run, BT=b, D=D,
                               STORE_Y=False, **ctx.opts)
            ctx.bwd[(BH,)](*ins, *_kernel_order(segment), dy, *_kernel_order(dslots), *grads, *scratch, n,
                           segment[0].shape[1], ctx.clip, c0, n_run, BT=b, D=D, **ctx.opts)
            if n_run % 2:
                for g in dslots:
                    g[:, 0] = g[:, 1]
        return (None, None, None, None, *grads, *(g[:, 0] for g in dslots))


def _slots(state, n_slots: int) -> list[Tensor]:
    """fp32 state slots ``(BH, n_slots, d_in, d_out)`` per state tensor, slot 0 = ``state``."""
    slots = []
    for t in state:
        slots.append(t.new_empty(t.shape[0], n_slots, *t.shape[1:], dtype=torch.float32))
        slots[-1][:, 0] = t
    return slots


def _kernel_order(state):
    """``[*weights, *momentum]`` -> the kernels' order ``W1, S1`` (depth 1) or ``W1, S1, W2, S2``."""
    if len(state) == 4:
        w1, w2, s1, s2 = state
        return w1, s1, w2, s2
    return tuple(state)


def _bwd_scratch(q: Tensor, depth: int, opts: dict) -> list[Tensor]:
    """The depth-2 backward's per-program scratch (``dual_form.bwd_scratch_elems``), as the one-element
    list of its extra argument; depth 1 takes none."""
    if depth != 2:
        return []
    from .dual_form import bwd_scratch_elems

    BH, _, b, _ = q.shape
    return [torch.empty(BH, bwd_scratch_elems(b, opts["DP"], opts["E"]), device=q.device, dtype=torch.float32)]


def _options(q: Tensor, depth: int, E: int, activation: str, clip: float) -> dict:
    """The kernels' constexprs and compiler options (depth 1 is linear: no activation, no tiles;
    ``CLIP`` compiles the surprise clip in, so the bare rule pays nothing for it; ``DP`` is the head
    dimension padded to a power of two, :func:`_padded`)."""
    opts = dict(DP=_padded(q.shape[-1]), PREC=_precision(q), CLIP=clip > 0, **_launch_options(q))
    if depth == 2:
        opts.update(E=E, EB=_block_e(E), ACT=_ACT_CODES[activation])
    return opts
