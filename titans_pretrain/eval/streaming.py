"""Evaluation through the model's streaming state: inputs of any length, bounded memory.

`TitansLM.forward(piece, state=..., return_state=True)` processes a sequence piece by piece and
equals processing it whole; the state holds the memory weights, conv tails, one window of keys and
values per attention layer and fewer than one unit of pending ids, whatever the length. Everything
here feeds pieces through that state under `no_grad` and keeps per-token results only (a loss and
whether the argmax was right), never logits or activations of past pieces, so the memory an
evaluation needs is that of one piece plus the state.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PieceResult", "StreamPoint", "default_piece_len", "iter_stream", "peak_rss_bytes", "rss_bytes",
           "state_nbytes", "stream_benchmark", "token_losses", "whole_sequence_losses"]


@dataclass
class PieceResult:
    """Per-token results of one piece: predictions of ``tokens[:, start + 1 : start + 1 + n]``."""

    start: int
    loss: Tensor  # (B, n) cross-entropy, fp32 (fp64 for an fp64 model)
    correct: Tensor  # (B, n) bool: argmax == target
    state: object  # the model's TitansState after the piece


def default_piece_len(model, batch: int = 1, logits_budget_bytes: int = 256 << 20) -> int:
    """A piece length that is a multiple of the model's streaming unit (so no token is recomputed)
    and keeps one piece's fp32 logits under ``logits_budget_bytes``."""
    unit = model.config.unit
    fit = logits_budget_bytes // (4 * batch * model.config.vocab_size)
    return max(unit, min(4096, fit) // unit * unit)


def _at_least_fp32(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@torch.no_grad()
def iter_stream(model, tokens: Tensor, piece_len: int) -> Iterator[PieceResult]:
    """Feed ``tokens[:, :-1]`` ``(B, N)`` in pieces of ``piece_len`` and yield each piece's losses
    against ``tokens[:, 1:]``. ``tokens`` may live on the CPU; pieces move to the model's device."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (batch, length >= 2), got shape {tuple(tokens.shape)}")
    if piece_len < 1:
        raise ValueError(f"piece_len must be >= 1, got {piece_len}")
    device = next(model.parameters()).device
    state, n = None, tokens.shape[1] - 1
    for start in range(0, n, piece_len):
        end = min(n, start + piece_len)
        x = tokens[:, start:end].to(device)
        y = tokens[:, start + 1:end + 1].to(device)
        out = model(x, state=state, return_state=True)
        state = out.state
        logits = _at_least_fp32(out.logits)
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        yield PieceResult(start, loss.cpu(), (logits.argmax(-1) == y).cpu(), state)


def token_losses(model, tokens: Tensor, piece_len: int) -> tuple[Tensor, Tensor]:
    """Per-token ``(loss, correct)``, each ``(B, N - 1)``, computed by streaming."""
    losses, correct = [], []
    for piece in iter_stream(model, tokens, piece_len):
        losses.append(piece.loss)
        correct.append(piece.correct)
    return torch.cat(losses, dim=1), torch.cat(correct, dim=1)


@torch.no_grad()
def whole_sequence_losses(model, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The same as :func:`token_losses` in one forward call (the reference for short inputs)."""
    device = next(model.parameters()).device
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    logits = _at_least_fp32(model(x).logits)
    loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    return loss.cpu(), (logits.argmax(-1) == y).cpu()


def state_nbytes(obj) -> int:
    """Bytes held by every tensor inside a (nested) streaming state."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(state_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _status_kib(field: str) -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux ``VmRSS``; None elsewhere)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far (Linux ``VmHWM``; None elsewhere)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


@dataclass
class StreamPoint:
    """A measurement taken after ``tokens`` tokens were streamed."""

    tokens: int
    seconds: float
    tokens_per_s: float
    rss_mib: float | None
    peak_rss_mib: float | None
    cuda_peak_mib: float | None
    state_bytes: int
    mean_loss: float  # over the tokens since the previous point


def stream_benchmark(model, total_tokens: int, piece_len: int, checkpoints: list[int], *,
                     batch: int = 1, seed: int = 0, source: Callable[[int, int], Tensor] | None = None,
                     log: Callable[[str], None] | None = None) -> list[StreamPoint]:
    """Stream ``total_tokens`` tokens (per sequence) through ``model`` and measure at each of
    ``checkpoints`` (token counts): throughput since the start, current and peak RSS, CUDA peak
    allocation, and the state's size. ``source(start, n)`` returns the next ``(batch, n)`` ids
    (default: uniform random ids, which exercise the same compute as text)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    if source is None:
        def source(start: int, n: int) -> Tensor:
            return torch.randint(0, model.config.vocab_size, (batch, n), generator=gen)
    marks = sorted(c for c in checkpoints if 0 < c <= total_tokens)
    points: list[StreamPoint] = []
    state, done, loss_sum, loss_n = None, 0, 0.0, 0
    prev = source(0, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        while done < total_tokens:
            n = min(piece_len, total_tokens - done, (marks[0] if marks else total_tokens) - done)
            nxt = source(done + 1, n)
            ids = torch.cat((prev, nxt), dim=1).to(device)
            out = model(ids[:, :-1], state=state, return_state=True)
            state = out.state
            loss = F.cross_entropy(out.logits.float().transpose(1, 2), ids[:, 1:], reduction="sum")
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + ids[:, 1:].numel()
            prev, done = nxt[:, -1:], done + n
            del out, ids
            while marks and done >= marks[0]:
                marks.pop(0)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                rss, peak = rss_bytes(), peak_rss_bytes()
                points.append(StreamPoint(
                    tokens=done, seconds=dt, tokens_per_s=done * batch / dt,
                    rss_mib=None if rss is None else rss / 2**20, peak_rss_mib=None if peak is None else peak / 2**20,
                    cuda_peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                    state_bytes=state_nbytes(state), mean_loss=loss_sum / max(1, loss_n)))
                loss_sum, loss_n = 0.0, 0
                if log is not None:
                    p = points[-1]
                    log(f"[stream] {p.tokens:>10,} tokens  {p.tokens_per_s:>9,.0f} tok/s  "
                        f"rss {p.rss_mib or 0:8.1f} MiB  peak rss {p.peak_rss_mib or 0:8.1f} MiB"
                        + (f"  cuda peak {p.cuda_peak_mib:8.1f} MiB" if p.cuda_peak_mib is not None else "")
                        + f"  state {p.state_bytes / 2**20:.2f} MiB  loss {p.mean_loss:.3f}")
    return points
