"""Training stability at the paper's shapes: the bare memory rule against the surprise clip.

The runs of the stability check in bench/RESULTS.md ("Memory stability"): a paper-scale preset,
cut to a few layers, at 4K context and the paper's learning rate 4e-4, one sequence per step, once
per memory rule. Each run is a plain ``titans-pretrain train`` into ``OUT/<name>``; then this script
reads their ``metrics.jsonl`` and draws the loss, gradient-norm and memory-weight curves into one
PNG, and prints the table that RESULTS.md records. Usage::

    python bench/bench_stability.py run  --out runs/stability --name mac_clip configs/mac_170m.yaml \\
        --layers 2 --warmup 10 --steps 300                                    # the default (clip)
    python bench/bench_stability.py run  --out runs/stability --name mac_bare configs/mac_170m.yaml \\
        --layers 2 --warmup 10 --steps 300 model.surprise_clip=0              # the bare rule
    python bench/bench_stability.py plot --out runs/stability mac_bare mac_clip --png curves.png

A run that diverges stops after ``train.max_bad_steps`` non-finite steps (exit 3), which the table
reports. CPU: about 20 s per step for two layers of the 170M preset on one core.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args) -> int:
    out = Path(args.out) / args.name
    cmd = [sys.executable, "-m", "titans_pretrain", "train", args.config, f"run_dir={out}",
           f"model.n_layers={args.layers}", f"optim.warmup_steps={args.warmup}", f"train.steps={args.steps}",
           "train.micro_batch_size=1", f"train.global_batch_tokens={args.seq_len}", f"data.seq_len={args.seq_len}",
           f"data.path={args.data}", "logging.interval=1", "checkpoint.interval=0",
           "checkpoint.save_at_end=false", "train.sample_tokens=0", "train.val_interval=0",
           "train.val_batches=0", "logging.tensorboard=false", "parallel.activation_checkpointing=false",
           *args.overrides]
    print(" ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def _curves(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in lines if "loss" in m]
    wnorm = [max((v for k, v in m.items() if k.startswith("memory_weight_norm_max/")), default=math.nan)
             for m in steps]
    return {"step": [m["step"] for m in steps], "loss": [m["loss"] for m in steps],
            "grad_norm": [m["grad_norm"] for m in steps], "wnorm": wnorm}


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


def summary(name: str, c: dict) -> str:
    """One table row: steps run, non-finite steps, first non-finite, loss at 10/50/last, grad norms."""
    bad = [s for s, loss, g in zip(c["step"], c["loss"], c["grad_norm"]) if not (_finite(loss) and _finite(g))]
    finite = [(s, loss) for s, loss in zip(c["step"], c["loss"]) if _finite(loss)]

    def mean_loss(lo, hi):
        xs = [loss for s, loss in finite if lo <= s <= hi]
        return f"{sum(xs) / len(xs):.3f}" if xs else "-"

    last = c["step"][-1]
    gn = sorted(g for g in c["grad_norm"] if _finite(g))
    p50 = gn[len(gn) // 2] if gn else math.nan
    return (f"| {name} | {last} | {len(bad)} | {bad[0] if bad else '-'} | {mean_loss(1, 10)} | "
            f"{mean_loss(41, 50)} | {mean_loss(last - 9, last)} | {p50:.3g} | {gn[-1] if gn else math.nan:.3g} | "
            f"{max((w for w in c['wnorm'] if _finite(w)), default=math.nan):.3g} |")


def _moving_mean(xs: list[float], n: int) -> list[float]:
    """Mean of the last ``n`` finite values at each step (one sequence per step is a noisy loss)."""
    out = []
    for i in range(len(xs)):
        window = [x for x in xs[max(0, i - n + 1):i + 1] if math.isfinite(x)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: _curves(Path(args.out) / name) for name in args.names}
    print("| run | steps | non-finite steps | first | loss 1-10 | loss 41-50 | loss last 10 | grad norm p50 | "
          "grad norm max | memory weight norm max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, c in runs.items():
        print(summary(name, c))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, c in runs.items():
        loss = [x if _finite(x) else math.nan for x in c["loss"]]
        line, = axes[0].plot(c["step"], loss, lw=0.5, alpha=0.35)
        axes[0].plot(c["step"], _moving_mean(loss, 10), label=f"{name} (mean of 10)", lw=1.5, color=line.get_color())
        axes[1].semilogy(c["step"], [g if _finite(g) else math.nan for g in c["grad_norm"]], label=name, lw=1)
        axes[2].semilogy(c["step"], c["wnorm"], label=name, lw=1)
    for ax, title in zip(axes, ("training loss", "gradient norm (before clipping)", "largest memory-weight norm")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(args.title or "memory stability")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one training run into OUT/NAME")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="extra key=value overrides (e.g. model.surprise_clip=0)")
    r.add_argument("--out", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--layers", type=int, default=2)
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument("--steps", type=int, default=300)
    r.add_argument("--seq-len", type=int, default=4096)
    r.add_argument("--data", default="data/stability_32k", help="prepared once from the embedded corpus")
    p = sub.add_parser("plot", help="table and PNG from finished runs")
    p.add_argument("names", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--png", required=True)
    p.add_argument("--title", default="")
    args = ap.parse_args()
    return run(args) if args.cmd == "run" else plot(args)


if __name__ == "__main__":
    sys.exit(main())
