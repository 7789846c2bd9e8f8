"""Shared memory, registers and spills of the memory kernels, compiled for GPU architectures on CPU.

Not a test (tests/models/test_kernel_resources.py holds every shipped preset's shape to the H100's
limit). No GPU needed: Triton compiles for a named target and ships ``ptxas``. A kernel whose shared
memory exceeds the card's limit cannot launch (``auto`` mode then warns and runs PyTorch). A head
dimension that is not a power of two compiles at the padded width (``D = 96`` at 128). Usage::

    python tools/kernel_resources.py                              # the presets' shapes, sm_90 and sm_80
    python tools/kernel_resources.py --shape 64,64,256 64,128,512 --block-e 16 32 --warps 4 8
    python tools/kernel_resources.py --record                     # ... and append to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from titans_pretrain.models.kernels.resources import compile_report  # noqa: E402

COLUMNS = ("kernel", "arch", "b", "D", "E", "block_e", "num_warps", "shared", "limit", "fits", "registers",
           "spill_stores", "spill_loads")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 90 80")
    ap.add_argument("--shape", nargs="+", default=["64,64,256", "64,96,384", "64,128,512"],
                    help="chunk,D,E (the presets': 64,64,256 at 170M and 340M, 64,96,384 at 760M)")
    ap.add_argument("--depth", type=int, nargs="+", default=[2])
    ap.add_argument("--block-e", type=int, nargs="+", default=[0], help="hidden tile width (0: the default)")
    ap.add_argument("--warps", type=int, nargs="+", default=[0], help="num_warps (0: the default)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()

    rows = []
    for arch, shape, depth, block, warps in itertools.product(args.arch, args.shape, args.depth, args.block_e,
                                                              args.warps):
        b, D, E = (int(x) for x in shape.split(","))
        for which in ("fwd", "bwd"):
            r = compile_report(which, arch=arch, b=b, D=D, E=E, depth=depth, block_e=block or None,
                               num_warps=warps or None)
            rows.append("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
            print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    table = [f"### Kernel resources, {datetime.date.today()}, commit {commit}",
             f"`python tools/kernel_resources.py {' '.join(sys.argv[1:])}` (compiled on CPU; shared in bytes, "
             "limit = the most one block may use; registers and spills per thread from `ptxas -v`).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS), *rows, ""]
    print("\n".join(table))
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
