"""PNG figures of the evaluation results (matplotlib, Agg backend: no display needed).

matplotlib is an optional dependency (the ``[eval]`` extra); without it the JSON results are still
written and the figures are skipped with a message saying how to get them.
"""
from __future__ import annotations

from pathlib import Path

from titans_pretrain.eval.needle_eval import NeedleGrid
from titans_pretrain.eval.perplexity import PerplexityResult

__all__ = ["have_matplotlib", "plot_loss_curve", "plot_needle_heatmap"]

MISSING = "matplotlib is not installed: pip install 'titans-pretrain[eval]' to get the PNG figures"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_needle_heatmap(grid: NeedleGrid, path: str | Path, title: str = "") -> Path:
    """Accuracy heatmap: needle depth (rows) x context length (columns), numbers in the cells."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(grid.lengths) + 2.5, 0.6 * len(grid.depths) + 1.8))
    im = ax.imshow(grid.accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(grid.lengths)), [str(n) for n in grid.lengths])
    ax.set_yticks(range(len(grid.depths)), [f"{d:.0%}" for d in grid.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid.accuracy):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title or f"{grid.task}: exact-match accuracy ({grid.samples} samples per cell)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_loss_curve(result: PerplexityResult, path: str | Path, title: str = "") -> Path:
    """Mean loss by token position (log x), with the attention span marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    mids = [(a + b - 1) / 2 + 1 for a, b in result.bins]
    ax.plot(mids, result.bin_loss, marker="o", ms=3)
    if result.attention_span:
        ax.axvline(result.attention_span, color="grey", ls="--", label=f"attention span ({result.attention_span})")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title or f"loss by position ({result.streams} validation streams)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
