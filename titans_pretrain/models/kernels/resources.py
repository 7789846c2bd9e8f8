"""What the memory kernels cost an SM, found by compiling them for a GPU architecture on any machine.

Triton compiles for a named target without a GPU (its ``ptxas`` ships in the wheel), so this answers,
on CPU, the question a launch answers too late: does the kernel fit the card's shared memory (a
kernel that does not cannot launch, and ``auto`` mode falls back to PyTorch), and how many registers
does it spill. ``tools/kernel_resources.py`` prints these for a sweep; the tests hold every
preset's shape to the H100's limit.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

__all__ = ["SHARED_LIMIT", "compile_report", "matmul_flops"]

# Largest shared memory one block may use (opt-in), by compute capability: A100, L40/4090, H100/H200.
SHARED_LIMIT = {80: 166_912, 89: 101_376, 90: 232_448}


def matmul_flops(b: int, D: int, E: int, clip: bool = False) -> dict:
    """Matmul FLOPs of one chunk of one (sequence, head) at depth 2 (docs/kernels.md derives the terms):
    ``fwd`` and ``bwd`` are the dual form's floor (backward without recomputing forward); ``kernel_fwd``
    and ``kernel_bwd`` are what the tiled kernels compute (the interpreter tests count them at every
    ``tl.dot``). The forward's second pass over the hidden tiles recomputes the key path; the backward
    recomputes the chunk's forward once (key path, ``e1``, the read's ``x1``, ``P0``, ``P1``: ``10bDE +
    2b^2 D + 4b^2 E`` over the floor), its later passes taking tile-local values from a scratch.
    The surprise clip adds a pass for ``|d1|^2`` to the forward (``k W1`` and ``d2 W2^T``: ``4bDE``)
    and ``sum_t (g1 d1) W2`` to the backward (``2bDE``).

    A head dimension ``D`` that is not a power of two is computed at the padded width (the kernels'
    ``DP``, the next power of two: ``D = 96`` runs at 128, so ``4/3`` of the FLOPs at ``D = 96``, zero
    columns included): the ``kernel_*`` counts use it, the floor uses ``D``."""
    from . import _padded

    P = _padded(D)
    return dict(fwd=22 * b * D * E + 4 * b * b * (D + E), bwd=44 * b * D * E + 8 * b * b * (D + E),
                kernel_fwd=24 * b * P * E + 4 * b * b * (P + E) + (4 * b * P * E if clip else 0),
                kernel_bwd=54 * b * P * E + 10 * b * b * P + 12 * b * b * E + (2 * b * P * E if clip else 0))


def _signature(fn, constexprs: dict) -> dict:
    ints = ("n_chunks", "n_slots", "c0", "n_run")
    kind = lambda n: "constexpr" if n in constexprs else "i32" if n in ints else "fp32" if n == "clip" else "*fp32"  # noqa: E731
    return {n: kind(n) for n in fn.arg_names}


def compile_report(which: str, *, arch: int = 90, b: int = 64, D: int = 64, E: int = 256, depth: int = 2,
                   block_e: int | None = None, num_warps: int | None = None, activation: str = "gelu",
                   precision: str = "tf32", clip: bool = True) -> dict:
    """Compile the ``which`` (``"fwd"`` or ``"bwd"``) kernel of ``depth`` for ``sm_<arch>`` with the
    options a launch would use (``block_e``, ``num_warps``: the runtime defaults unless given; ``clip``:
    the surprise clip compiled in, as the model's default) and
    report ``shared`` (bytes, Triton's allocation), ``limit``, ``fits``, and per thread
    ``registers``, ``spill_stores`` and ``spill_loads`` (bytes, from ``ptxas -v``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _ACT_CODES, _block_e, _num_warps, _padded, dual_form

    fn = getattr(dual_form, f"mlp{depth}_{which}_kernel")
    consts = dict(BT=b, D=D, DP=_padded(D), PREC=precision, CLIP=clip,
                  **({"STORE_Y": True} if which == "fwd" else {}))
    if depth == 2:
        consts.update(E=E, EB=min(block_e, E) if block_e else _block_e(E), ACT=_ACT_CODES[activation])
    num_warps = num_warps or _num_warps()
    names = fn.arg_names
    src = ASTSource(fn=fn, signature=_signature(fn, consts),
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": 1,
                                       "enable_fp_fusion": True})  # Triton 3.9's default, as launches use
    report = dict(kernel=f"mlp{depth}_{which}", arch=arch, b=b, D=D, E=E if depth == 2 else D,
                  block_e=consts.get("EB"), num_warps=num_warps, clip=clip, shared=compiled.metadata.shared,
                  limit=SHARED_LIMIT.get(arch))
    report["fits"] = report["limit"] is None or report["shared"] <= report["limit"]
    report.update(_ptxas_usage(compiled.asm["ptx"], arch))
    return report


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread, from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses for arch

    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    found = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out)) else None  # noqa: E731
    return dict(registers=found(r"Used (\d+) registers"), spill_stores=found(r"(\d+) bytes spill stores"),
                spill_loads=found(r"(\d+) bytes spill loads"))
