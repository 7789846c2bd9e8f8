"""The fused Triton dual form (models/kernels/) against the PyTorch ``memory_chunked``.

Outputs, final states and the gradients of every input (q, k, v, the three gates, initial weights and
momentum) must match the PyTorch path in fp32 and the fp64 PyTorch path, within 1e-5 relative (max
abs error over max abs value). On CPU the kernels run under Triton's interpreter, which must be
switched on before triton is imported: all CPU cases run in one subprocess (``python
tests/models/test_memory_kernels.py`` is that worker) and the tests read its report. With a GPU the
same cases, plus the 170M presets' layer shape, also run compiled on the device, in-process. The
depth-2 kernels walk the hidden width in tiles of 16: ``E`` = 16, 32 and 64 cover one, two and four;
48 and 384 cover widths that are not powers of two. Head dimensions 48 and 96 run padded to 64 and 128.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titans_pretrain.models import kernels
from titans_pretrain.models.kernels.resources import matmul_flops
from titans_pretrain.models.memory_ops import (MemoryState, init_state, memory_chunked, surprise_clip_scale,
                                               surprise_gradients)

RTOL = 1e-5
ROOT = Path(__file__).resolve().parents[2]

# name: (B, H, T, D, E, depth, chunk, activation, what the loss reads, input dtype, surprise clip)
# The clip values sit inside the spread of the cases' surprise norms, so that some tokens are clipped
# and some are not (checked by test_clip_cases_clip_some_tokens).
CASES = {
    "d2_gelu_pad": (2, 1, 40, 16, 32, 2, 16, "gelu", "both", torch.float32, 0.0),   # 3 chunks, last one short
    "d1_silu": (1, 2, 32, 16, 16, 1, 16, "silu", "both", torch.float32, 0.0),
    "d2_silu_one_chunk": (1, 1, 16, 16, 32, 2, 64, "silu", "both", torch.float32, 0.0),  # chunk > T
    "d2_gelu_y_only": (1, 1, 32, 16, 16, 2, 16, "gelu", "y", torch.float32, 0.0),   # no state gradient flows in
    "d2_gelu_state_only": (1, 1, 32, 16, 16, 2, 16, "gelu", "state", torch.float32, 0.0),  # no dy
    "d2_gelu_bf16_inputs": (1, 2, 32, 16, 32, 2, 16, "gelu", "both", torch.bfloat16, 0.0),
    "d2_silu_4_tiles": (1, 1, 48, 16, 64, 2, 16, "silu", "both", torch.float32, 0.0),  # hidden width in 4 tiles
    "d1_gelu_clip": (1, 2, 40, 16, 16, 1, 16, "gelu", "both", torch.float32, 8.0),
    "d2_gelu_clip_pad": (2, 1, 40, 16, 32, 2, 16, "gelu", "both", torch.float32, 7.0),
    "d2_silu_clip_4_tiles": (1, 1, 48, 16, 64, 2, 16, "silu", "both", torch.float32, 8.0),
    # Head dimensions that are not powers of two (the kernels pad D to DP with zeros) and hidden widths
    # that are multiples of the tile but not powers of two: the 760M presets' D=96, E=384 (24 tiles, D
    # padded to 128), at a small chunk; D=48 (padded to 64), E=48 (3 tiles).
    "d2_gelu_d96_e384": (1, 1, 32, 96, 384, 2, 16, "gelu", "both", torch.float32, 0.0),
    "d2_silu_d96_e384_clip_pad": (1, 1, 40, 96, 384, 2, 16, "silu", "both", torch.float32, 22.0),  # T % 16 != 0
    "d1_gelu_d96_clip_pad": (1, 2, 40, 96, 96, 1, 16, "gelu", "both", torch.float32, 19.5),
    "d2_gelu_d128_e512_clip": (1, 1, 32, 128, 512, 2, 16, "gelu", "both", torch.float32, 25.0),  # 1.3B/7B shape
    "d2_gelu_d48_e48_pad": (2, 1, 40, 48, 48, 2, 16, "gelu", "both", torch.float32, 0.0),
}


def _inputs(B, H, T, D, E, depth, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    nrm = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731  (the layer's l2-normed q, k)
    q, k = nrm(torch.randn(B, H, T, D, generator=g)), nrm(torch.randn(B, H, T, D, generator=g))
    v = torch.randn(B, H, T, D, generator=g)
    theta = 0.5 * torch.rand(B, H, T, generator=g)
    eta = 0.5 + 0.5 * torch.rand(B, H, T, generator=g)
    alpha = 0.2 * torch.rand(B, H, T, generator=g)
    dims = [D] + [E] * (depth - 1) + [D]
    m0 = [torch.randn(H, dims[i], dims[i + 1], generator=g) * dims[i] ** -0.5 for i in range(depth)]
    s0 = [0.1 * torch.randn(B, H, dims[i], dims[i + 1], generator=g) * dims[i] ** -0.5 for i in range(depth)]
    probes = [torch.randn(B, H, T, D, generator=g)] + [torch.randn(B, H, dims[i], dims[i + 1], generator=g)
                                                      for _ in range(2) for i in range(depth)]
    to = lambda x, dt=torch.float32: x.to(device=device, dtype=dt)  # noqa: E731
    return [to(x, dtype) for x in (q, k, v)] + [to(x) for x in (theta, eta, alpha)], \
        [to(x) for x in m0], [to(x) for x in s0], [to(x) for x in probes]


def _run(mode, case, device, state_dtype, interval=1):
    """Forward + backward of one case on one path: ``[y, *final state, *gradients of all inputs]``."""
    B, H, T, D, E, depth, chunk, act, reads, in_dtype, clip = case
    tensors, m0, s0, probes = _inputs(B, H, T, D, E, depth, in_dtype, device)
    if state_dtype == torch.float64:
        tensors = [t.double() for t in tensors]
        m0, s0, probes = ([t.double() for t in ts] for ts in (m0, s0, probes))
    leaves = [t.detach().requires_grad_() for t in tensors + m0 + s0]
    n_in = len(tensors)
    w0 = init_state(leaves[n_in:n_in + depth], B)
    state = MemoryState(w0.weights, tuple(leaves[n_in + depth:]))
    with kernels.memory_kernel(mode):
        y, final = memory_chunked(*leaves[:n_in], state, chunk_size=chunk, activation=act, surprise_clip=clip,
                                  state_interval=interval)
    finals = [*final.weights, *final.momentum]
    loss = 0.0
    if reads in ("y", "both"):
        loss = loss + (y.double() * probes[0]).sum()
    if reads in ("state", "both"):
        loss = loss + sum((s.double() * p).sum() for s, p in zip(finals, probes[1:]))
    grads = torch.autograd.grad(loss, leaves)
    return [y.double(), *(s.double() for s in finals), *(g.double() for g in grads)]


def _rtol64(name):
    """bf16 inputs return bf16 ``y`` and input gradients: against fp64, the tolerance is bf16's."""
    return 2.0 ** -7 if CASES[name][9] == torch.bfloat16 else RTOL


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(name, device, interval=1):
    """Max relative errors of the kernel against the fp32 and the fp64 PyTorch paths."""
    case = CASES[name]
    ours = _run("triton", case, device, torch.float32, interval)
    ref32 = _run("torch", case, device, torch.float32)
    ref64 = _run("torch", case, device, torch.float64)
    return {"vs_fp32": max(_rel_err(a, b) for a, b in zip(ours, ref32)),
            "vs_fp64": max(_rel_err(a, b) for a, b in zip(ours, ref64)),
            "n_tensors": len(ours)}


def _no_grad_matches(device, name="d2_gelu_pad"):
    """Inference (no state saved for backward): y and final state equal the PyTorch path's."""
    B, H, T, D, E, depth, chunk, act, _, _, clip = CASES[name]
    tensors, m0, s0, _ = _inputs(B, H, T, D, E, depth, torch.float32, device)
    out = {}
    for mode in ("triton", "torch"):
        with torch.no_grad(), kernels.memory_kernel(mode):
            y, st = memory_chunked(*tensors, MemoryState(init_state(m0, B).weights, tuple(s0)),
                                   chunk_size=chunk, activation=act, surprise_clip=clip)
        out[mode] = [y, *st.weights, *st.momentum]
    return max(_rel_err(a, b) for a, b in zip(out["triton"], out["torch"]))


def _clipped_fraction(name):
    """The fraction of the case's tokens whose surprise at the initial weights exceeds its clip."""
    B, H, T, D, E, depth, chunk, act, _, _, clip = CASES[name]
    tensors, m0, s0, _ = _inputs(B, H, T, D, E, depth, torch.float32, "cpu")
    inputs, deltas = surprise_gradients(tensors[1], tensors[2], init_state(m0, B).weights, activation=act)
    _, r2 = surprise_clip_scale(inputs, deltas, clip)
    return (r2 > clip * clip).double().mean().item()


def _dot_flops(b=32, D=16, E=64, n=2, clip=0.0):
    """Matmul FLOPs per chunk of the interpreted kernels, counted at ``tl.dot`` (b, D, E distinct so
    that every term of the documented count is pinned; a D that is not a power of two counts at its
    padded width)."""
    from triton.runtime import interpreter

    count = [0]
    dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b_, d, *args):
        count[0] += 2 * a.data.shape[-2] * a.data.shape[-1] * b_.data.shape[-1]
        return dot(self, a, b_, d, *args)

    tensors, m0, s0, _ = _inputs(1, 1, n * b, D, E, 2, torch.float32, "cpu")
    leaves = [t.requires_grad_() for t in tensors + m0]
    interpreter.InterpreterBuilder.create_dot = counting_dot
    try:
        with kernels.memory_kernel("triton"):
            y, st = memory_chunked(*leaves[:6], MemoryState(init_state(leaves[6:], 1).weights, tuple(s0)),
                                   chunk_size=b, activation="gelu", surprise_clip=clip)
            fwd, count[0] = count[0], 0
            (y.sum() + sum(w.sum() for w in st.weights)).backward()
    finally:
        interpreter.InterpreterBuilder.create_dot = dot
    return {"shape": [b, D, E], "clip": clip > 0, "fwd": fwd / n, "bwd": count[0] / n}


# ------------------------------------------------------------------------------- CPU (interpreter)
@pytest.fixture(scope="module")
def interpreted():
    """Run every case once under TRITON_INTERPRET=1 in a fresh process; return its JSON report."""
    assert kernels.triton_available(), "triton is missing (a dev dependency: fail, not skip): pip install -e '.[dev]' (it pins triton)"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Keeping every 2nd chunk-start state (TitansConfig.memory_state_interval): segments of two chunks,
# and a last segment of one (3 chunks), with and without the clip, depth 1 and 2.
INTERVAL_CASES = ("d2_gelu_pad", "d1_gelu_clip", "d2_silu_clip_4_tiles", "d2_gelu_d48_e48_pad")


@pytest.mark.parametrize("name", sorted(CASES) + [f"{n}@interval" for n in INTERVAL_CASES])
def test_interpreted_kernel_matches_pytorch(interpreted, name):
    errs = interpreted[name]
    assert errs["n_tensors"] >= 10
    assert errs["vs_fp32"] < RTOL, errs
    assert errs["vs_fp64"] < _rtol64(name.split("@")[0]), errs


def test_interpreted_kernel_no_grad(interpreted):
    assert interpreted["no_grad"] < RTOL
    assert interpreted["no_grad_clip"] < RTOL


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if CASES[n][-1]])
def test_clip_cases_clip_some_tokens(name):
    """A clip case where no token (or every token) is clipped would not test the clip's gradient."""
    assert 0.2 < _clipped_fraction(name) < 0.8


@pytest.mark.parametrize("key", ["dot_flops", "dot_flops_clip", "dot_flops_padded"])
def test_interpreted_kernel_flops_are_the_documented_count(interpreted, key):
    counted = interpreted[key]
    documented = matmul_flops(*counted["shape"], clip=counted["clip"])
    assert counted["fwd"] == documented["kernel_fwd"] and counted["bwd"] == documented["kernel_bwd"], counted


# ---------------------------------------------------------------------------------------- dispatch
def test_dispatch_rules(monkeypatch):
    supported = dict(depth=2, activation="gelu", dtype=torch.float32, chunk=64, dims=[("D", 64), ("E", 256)])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.kernel_mode() == "auto"
    assert kernels.use_triton(cuda, **supported)                 # auto: the kernel on CUDA ...
    assert not kernels.use_triton(cpu, **supported)              # ... PyTorch elsewhere ...
    for good in (dict(dims=[("D", 96), ("E", 384), ("D_out", 96)]),     # the 760M presets (D padded to 128)
                 dict(dims=[("D", 128), ("E", 512), ("D_out", 128)]), dict(dims=[("D", 48), ("E", 48)]),
                 dict(depth=1, dims=[("D", 96), ("D_out", 96)]), dict(chunk=16)):
        assert kernels.unsupported_reason(**{**supported, **good}) is None, good
        assert kernels.use_triton(cuda, **{**supported, **good})
    for bad in (dict(depth=3), dict(activation="relu"), dict(dtype=torch.float64), dict(chunk=48), dict(chunk=8),
                dict(dims=[("D", 8), ("E", 32)]), dict(dims=[("D", 72), ("E", 256)]),
                dict(dims=[("D", 64), ("E", 40)]), dict(dims=[("D", 64), ("E", 256), ("D_out", 32)])):
        assert not kernels.use_triton(cuda, **{**supported, **bad})  # ... and for what it cannot run
    with kernels.memory_kernel("torch"):
        assert not kernels.use_triton(cuda, **supported)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert not kernels.use_triton(cuda, **supported)
    with kernels.memory_kernel("triton"):                        # the context manager wins over the env
        with pytest.raises(ValueError, match="chunk .* = 48 .*power of two >= 16.*model choice"):
            kernels.use_triton(cuda, **{**supported, "chunk": 48})
        with pytest.raises(ValueError, match="head dimension D = 72 .*multiple of 16"):
            kernels.use_triton(cuda, **{**supported, "dims": [("D", 72), ("E", 256)]})
        with pytest.raises(ValueError, match="hidden width E = 40 .*multiple of 16"):
            kernels.use_triton(cuda, **{**supported, "dims": [("D", 64), ("E", 40)]})
        with pytest.raises(ValueError, match="memory depth 3"):
            kernels.use_triton(cuda, **{**supported, "depth": 3})
        with pytest.raises(ValueError, match="value dimension 32"):
            kernels.use_triton(cuda, **{**supported, "dims": [("D", 64), ("E", 256), ("D_out", 32)]})
    assert kernels._block_e(384) == 16 and kernels._block_e(16) == 16
    assert kernels._padded(96) == 128 and kernels._padded(64) == 64 and kernels._padded(48) == 64
    monkeypatch.setenv("TITANS_KERNEL_BLOCK_E", "32")                # halved until it divides E
    assert kernels._block_e(384) == 32 and kernels._block_e(48) == 16 and kernels._block_e(16) == 16
    monkeypatch.setenv("TITANS_KERNEL_BLOCK_E", "24")
    with pytest.raises(ValueError, match="TITANS_KERNEL_BLOCK_E"):
        kernels._block_e(256)
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="TITANS_MEMORY_KERNEL"):
        kernels.kernel_mode()
    with pytest.raises(ValueError, match="memory_kernel"):
        with kernels.memory_kernel("cuda"):
            pass


def test_forced_kernel_on_cpu_without_interpreter_names_the_fix():
    if kernels._interpreter_active():
        pytest.skip("this process imported triton under TRITON_INTERPRET=1")
    tensors, m0, s0, _ = _inputs(1, 1, 16, 16, 16, 1, torch.float32, "cpu")
    with kernels.memory_kernel("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        memory_chunked(*tensors, init_state(m0, 1), chunk_size=16)


def test_kernel_that_cannot_build_falls_back_in_auto_mode(monkeypatch):
    """A card without the shared memory for a shape: auto mode warns, runs PyTorch, remembers the shape;
    forced mode raises. (Building needs CUDA, so the compiler's error is raised by hand here.)"""
    from triton.runtime.errors import OutOfResources

    def no_room(*args):
        raise OutOfResources(300_000, 232_448, "shared memory")

    class Fallback:
        apply = staticmethod(lambda *args: "pytorch path")

    monkeypatch.setattr(kernels.TritonDualForm, "apply", no_room)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    q = torch.zeros(2, 3, 64, 32)                                   # (BH, n_chunks, chunk, D)
    state = [torch.zeros(2, 32, 128), torch.zeros(2, 128, 32)] * 2
    args = ("gelu", 2, 0.0, 1, q, *[q] * 10, *state)
    dims = dict(depth=2, activation="gelu", dtype=torch.float32, chunk=64,
                dims=[("D", 32), ("E", 128), ("D_out", 32)])
    assert kernels.use_triton(torch.device("cuda"), **dims)
    try:
        with pytest.warns(RuntimeWarning, match="shared memory"):
            assert kernels.apply_dual_form(Fallback, *args) == "pytorch path"
        assert not kernels.use_triton(torch.device("cuda"), **dims)
        with kernels.memory_kernel("triton"), pytest.raises(OutOfResources):
            kernels.apply_dual_form(Fallback, *args)
    finally:
        kernels._FAILED.clear()


# --------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_kernel_matches_pytorch_on_gpu(name):
    errs = compare(name, "cuda")
    assert errs["vs_fp32"] < RTOL and errs["vs_fp64"] < _rtol64(name), errs


@gpu
@pytest.mark.parametrize("D", [64, 96])
def test_compiled_kernel_preset_shape_on_gpu(D):
    """The presets' layer shapes (head 64 and 96, expansion 4, chunk 64, depth 2), shortened to 4 chunks."""
    CASES["preset_shape"] = (2, 2, 256, D, 4 * D, 2, 64, "gelu", "both", torch.bfloat16, 10.0)
    try:
        errs = compare("preset_shape", "cuda")
    finally:
        del CASES["preset_shape"]
    assert errs["vs_fp32"] < 1e-4 and errs["vs_fp64"] < _rtol64("d2_gelu_bf16_inputs"), errs
    assert _no_grad_matches("cuda") < RTOL


def _worker():
    torch.manual_seed(0)
    report = {name: compare(name, "cpu") for name in CASES}
    for name in INTERVAL_CASES:
        report[f"{name}@interval"] = compare(name, "cpu", interval=2)
    report["no_grad"] = _no_grad_matches("cpu")
    report["no_grad_clip"] = _no_grad_matches("cpu", "d2_gelu_clip_pad")
    report["dot_flops"] = _dot_flops()
    report["dot_flops_clip"] = _dot_flops(clip=5.0)
    report["dot_flops_padded"] = _dot_flops(b=16, D=48, E=48)  # computed at the padded width, 64
    print(json.dumps(report))


if __name__ == "__main__":
    _worker()
