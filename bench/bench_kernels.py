"""One-shot GPU check of the fused memory kernel: build, correctness, floor, timings, a table.

Not a test. Meant for ONE call on a GPU machine (a few minutes)::

    python bench/bench_kernels.py                 # the 170M presets' layer shape, print a markdown table
    python bench/bench_kernels.py --record        # ... and append it to bench/RESULTS.md
    python bench/bench_kernels.py --T 1024 --quick

Steps: (1) the FLOP and byte floor of the shape (docs/kernels.md derives the counts); (2) the kernel
against the PyTorch path on the GPU (fp32 state, TF32 off: outputs, final state, all gradients;
and the fp64 PyTorch path on a shorter sequence); (3) forward+backward timings, TF32 on, inputs bf16,
state fp32: the memory core (``memory_chunked``) with the kernel and with the PyTorch loop, the
whole ``MemoryLayer`` both ways, and titans-pytorch ``NeuralMemory`` (default and ``batch_size`` =
chunk) when installed. Every case runs in this one process, one after the other; peak memory is
reset before each.
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from titans_pretrain.models import kernels  # noqa: E402
from titans_pretrain.models.kernels.resources import matmul_flops  # noqa: E402
from titans_pretrain.models.memory_ops import MemoryState, init_state, memory_chunked  # noqa: E402

# The 170M presets' memory layer: 12 heads x 64, chunk 64, depth 2, expansion 4, B=4, T=4096.
SHAPE = dict(B=4, T=4096, H=12, D=64, chunk=64, depth=2, expansion=4)
# Dense peaks (TFLOP/s: TF32 tensor cores, bf16 tensor cores) and HBM TB/s, by device-name substring.
PEAKS = {"H200": (494.7, 989.4, 4.8), "H100": (494.7, 989.4, 3.35), "A100": (156.0, 312.0, 2.0)}


# ------------------------------------------------------------------------------------------ floor
def bytes_per_chunk_head(b: int, D: int, E: int, in_bytes: int = 2) -> dict:
    """HBM bytes of one chunk of one (sequence, head): what must move, and what the design adds."""
    io = (3 * b * D * in_bytes          # q, k, v read in forward
          + b * D * 4                   # y written (fp32)
          + (3 * b * D * in_bytes) + b * D * 4   # backward: q, k, v again, dy
          + 3 * b * D * 4               # dq, dk, dv written
          + 2 * (b * b + 6 * b) * 4     # G, beta, f, ge, ne (+ scalars) read in forward and backward
          + (b * b + 4 * b) * 4)        # their gradients written
    saved = 2 * 4 * D * E * 4           # chunk-start W1, S1, W2, S2 (fp32): written in fwd, read in bwd
    return dict(compulsory=io, saved_states=saved)


def floor_report(s: dict) -> tuple[list[str], float | None]:
    b, D, E = s["chunk"], s["D"], s["expansion"] * s["D"]
    n = s["B"] * s["H"] * -(-s["T"] // b)
    fl, by = matmul_flops(b, D, E), bytes_per_chunk_head(b, D, E)
    fl["kernel"] = fl["kernel_fwd"] + fl["kernel_bwd"]
    floor_flop = (fl["fwd"] + fl["bwd"]) * n
    kernel_flop = fl["kernel"] * n
    lines = [f"chunks x (sequence, head) = {n}; per chunk-head: forward {fl['fwd']/1e6:.1f} MFLOP, backward "
             f"{fl['bwd']/1e6:.1f} MFLOP ({fl['kernel']/1e6:.1f} as the kernels compute, with recompute); "
             f"bytes {by['compulsory']/1024:.0f} KiB compulsory + {by['saved_states']/1024:.0f} KiB saved state",
             f"total: {floor_flop/1e9:.1f} GFLOP floor ({kernel_flop/1e9:.1f} as the kernel computes), "
             f"{by['compulsory']*n/1e9:.2f} GB compulsory + {by['saved_states']*n/1e9:.2f} GB saved states"]
    floor_ms = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((p for k, p in PEAKS.items() if k in name), None)
        if peak:
            tf32, _, hbm = peak
            t_flop = kernel_flop / (tf32 * 1e12) * 1e3
            t_bytes = (by["compulsory"] + by["saved_states"]) * n / (hbm * 1e12) * 1e3
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            progs = s["B"] * s["H"]
            t_serial = t_flop * sms / min(progs, sms)  # one program per (sequence, head): SMs left idle
            floor_ms = max(t_flop, t_bytes)
            lines.append(f"{name}: TF32 peak {tf32} TFLOP/s, HBM {hbm} TB/s -> {t_flop:.2f} ms of matmul, "
                         f"{t_bytes:.2f} ms of HBM traffic; with {progs} programs on {sms} SMs the matmul "
                         f"floor is {t_serial:.2f} ms")
    return lines, floor_ms


# -------------------------------------------------------------------------------------- the cases
def _core_inputs(s, device, T=None, seed=0):
    B, H, D = s["B"], s["H"], s["D"]
    T = T or s["T"]
    g = torch.Generator().manual_seed(seed)
    nrm = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    q, k = nrm(torch.randn(B, H, T, D, generator=g)), nrm(torch.randn(B, H, T, D, generator=g))
    v = torch.randn(B, H, T, D, generator=g)
    gates = [0.1 * torch.rand(B, H, T, generator=g), 0.8 + 0.2 * torch.rand(B, H, T, generator=g),
             0.02 * torch.rand(B, H, T, generator=g)]
    E = s["expansion"] * D
    dims = [D] + [E] * (s["depth"] - 1) + [D]
    m0 = [torch.randn(H, dims[i], dims[i + 1], generator=g) * dims[i] ** -0.5 for i in range(s["depth"])]
    return [x.to(device) for x in (q, k, v, *gates)], [w.to(device) for w in m0]


def core_grads(mode, s, device, dtype, T=None):
    """Forward + backward of memory_chunked on one path: [y, *final state, *grads of all inputs]."""
    tensors, m0 = _core_inputs(s, device, T)
    leaves = [t.to(dtype if i < 3 else (torch.float64 if dtype == torch.float64 else torch.float32))
              .requires_grad_() for i, t in enumerate(tensors)]
    m0 = [w.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_() for w in m0]
    with kernels.memory_kernel(mode):
        y, st = memory_chunked(*leaves, init_state(m0, s["B"]), chunk_size=s["chunk"])
    g = torch.Generator(device=device).manual_seed(1)
    loss = (y.double() * torch.randn(y.shape, generator=g, device=device, dtype=torch.float64)).sum()
    loss = loss + sum((w.double() ** 2).sum() * 1e-3 for w in (*st.weights, *st.momentum))
    grads = torch.autograd.grad(loss, leaves + m0)
    return [y.double(), *(w.double() for w in (*st.weights, *st.momentum)), *(x.double() for x in grads)]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(s, device, T_fp64):
    torch.backends.cuda.matmul.allow_tf32 = False
    out = []
    ours, ref = core_grads("triton", s, device, torch.float32), core_grads("torch", s, device, torch.float32)
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    out.append(("kernel vs PyTorch fp32, T=%d" % s["T"], max(errs)))
    ours, ref = (core_grads("triton", s, device, torch.float32, T=T_fp64),
                 core_grads("torch", s, device, torch.float64, T=T_fp64))
    out.append(("kernel vs PyTorch fp64, T=%d" % T_fp64, max(rel_err(a, b) for a, b in zip(ours, ref))))
    del ours, ref
    torch.cuda.empty_cache()
    return out


def build_case(case, s, device):
    """(step function, tokens per step) for one timed case; bf16 autocast, fp32 state."""
    B, T, H, D = s["B"], s["T"], s["H"], s["D"]
    if case.startswith("core"):
        tensors, m0 = _core_inputs(s, device)
        q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in tensors[:3])
        gates = [t.requires_grad_() for t in tensors[3:]]
        m0 = [w.requires_grad_() for w in m0]
        mode = "triton" if case == "core_kernel" else "torch"

        def step():
            with kernels.memory_kernel(mode):
                y, _ = memory_chunked(q, k, v, *gates, init_state(m0, B), chunk_size=s["chunk"])
            y.float().sum().backward()

        return step
    x = torch.randn(B, T, H * D, device=device, requires_grad=True)
    if case.startswith("layer"):
        from titans_pretrain.models import TitansConfig
        from titans_pretrain.models.memory import MemoryLayer

        cfg = TitansConfig(variant="lmm", d_model=H * D, n_heads=H, chunk_size=s["chunk"],
                           memory_depth=s["depth"], memory_expansion=s["expansion"])
        layer = MemoryLayer(cfg).to(device)
        mode = "triton" if case == "layer_kernel" else "torch"

        def step():
            with kernels.memory_kernel(mode), torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x)[0]
            out.float().sum().backward()

        return step
    from titans_pytorch import NeuralMemory

    mem = NeuralMemory(dim=H * D, heads=H, dim_head=D, chunk_size=s["chunk"],
                       batch_size=s["chunk"] if case == "tp_nm64" else None,
                       default_model_kwargs=dict(depth=s["depth"], expansion_factor=float(s["expansion"]))).to(device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mem(x)[0]
        out.float().sum().backward()

    return step


CASES = {
    "core_kernel": "memory_chunked, Triton kernel",
    "core_torch": "memory_chunked, PyTorch chunk loop",
    "layer_kernel": "MemoryLayer (projections, conv, gates, norm, out-proj), Triton kernel",
    "layer_torch": "MemoryLayer, PyTorch chunk loop",
    "tp_nm": "titans-pytorch NeuralMemory, default (batch_size=None)",
    "tp_nm64": "titans-pytorch NeuralMemory, batch_size=chunk (our rule)",
}


def time_case(case, s, device, repeats, budget_s):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = build_case(case, s, device)
    t0 = time.perf_counter()
    step()  # build / warm-up
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        if sum(times) + first > budget_s:
            break
    times.sort()
    med = times[len(times) // 2]
    return dict(case=case, step_ms=med * 1e3, tokens_per_s=s["B"] * s["T"] / med,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, first_s=first, n=len(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=SHAPE["B"])
    ap.add_argument("--T", type=int, default=SHAPE["T"])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--case-budget-s", type=float, default=40.0, help="stop repeating a case after this")
    ap.add_argument("--fp64-T", type=int, default=512, help="sequence length of the fp64 check")
    ap.add_argument("--quick", action="store_true", help="skip the correctness checks")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    SHAPE.update(B=args.B, T=args.T)
    s = SHAPE
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA device (the CPU tests cover correctness)")
    import triton

    device = torch.device("cuda")
    head = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
            f"shape: B={s['B']} T={s['T']} heads {s['H']} x {s['D']}, chunk {s['chunk']}, depth {s['depth']}, "
            f"expansion {s['expansion']}; forward+backward; inputs bf16, state fp32"]
    floor_lines, floor_ms = floor_report(s)
    for line in head + floor_lines:
        print(line, flush=True)

    checks = [] if args.quick else check(s, device, args.fp64_T)
    for name, err in checks:
        print(f"{name}: max relative error {err:.2e}", flush=True)

    torch.backends.cuda.matmul.allow_tf32 = True  # the timing convention: fp32 with TF32
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    for case in args.cases.split(","):
        try:
            r = time_case(case, s, device, args.repeats, args.case_budget_s)
        except Exception as err:  # a missing titans-pytorch, an OOM: report and go on
            msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:120]
            print(f"{case}: skipped ({msg})", flush=True)
            rows.append(dict(case=case, error=msg))
            torch.cuda.empty_cache()
            continue
        rows.append(r)
        print(f"{case:13s} {r['tokens_per_s']:12.0f} tok/s {r['step_ms']:9.2f} ms {r['peak_gib']:7.2f} GiB "
              f"(first call {r['first_s']:.1f} s)", flush=True)
    for w in kernels._FAILED.values():
        print(f"NOTE: the kernel fell back to PyTorch: {w}")

    by = {r["case"]: r for r in rows if "error" not in r}
    ratios = [f"{a}/{b} = {by[a]['tokens_per_s'] / by[b]['tokens_per_s']:.2f}x"
              for a, b in (("core_kernel", "core_torch"), ("layer_kernel", "layer_torch"),
                           ("layer_kernel", "tp_nm"), ("layer_kernel", "tp_nm64"), ("core_kernel", "tp_nm"))
              if a in by and b in by]
    if floor_ms and "core_kernel" in by:
        ratios.append(f"core_kernel / floor = {by['core_kernel']['step_ms'] / floor_ms:.1f}x the floor time")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "uncommitted"
    lines = [f"\n### Fused memory kernel, {datetime.date.today()}, commit {commit}",
             *(f"- {x}" for x in head + floor_lines),
             *(f"- correctness: {n}: max relative error {e:.2e}" for n, e in checks),
             "", "| case | tokens/s | ms/step | peak GiB | what |", "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | - | - | - | skipped: {r['error']} |")
        else:
            lines.append(f"| {r['case']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.2f} | {r['peak_gib']:.2f} | "
                         f"{CASES[r['case']]} |")
    lines += ["", "Ratios: " + ", ".join(ratios)]
    print("\n".join(lines))
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
