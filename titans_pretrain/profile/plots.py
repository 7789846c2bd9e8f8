"""PNG plots of a sequence-length sweep (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path


def plot_sweep(rows: list[dict], path: Path, title: str) -> Path:
    """Tokens/s and peak memory against sequence length, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["seq_len"])
    xs = [r["seq_len"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [r["tokens_per_s"] for r in rows], marker="o")
    ax1.set(xscale="log", xlabel="sequence length", ylabel="tokens/s (all devices)", title="throughput")
    ax2.plot(xs, [r["peak_memory_bytes"] / 2**20 for r in rows], marker="o", color="tab:red")
    ax2.set(xscale="log", xlabel="sequence length", ylabel=f"peak memory (MiB, {rows[0]['peak_memory_kind']})",
            title="peak memory")
    for ax in (ax1, ax2):
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
