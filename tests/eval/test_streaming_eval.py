"""Streaming evaluation equals whole-sequence evaluation, and its memory does not grow with length."""
import pytest
import torch

from titans_pretrain.eval.perplexity import position_bins
from titans_pretrain.eval.streaming import (iter_stream, rss_bytes, state_nbytes, stream_benchmark, token_losses,
                                            whole_sequence_losses)
from titans_pretrain.models import TitansConfig, TitansLM

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(variant, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = dict(variant=variant, vocab_size=61, d_model=32, n_layers=2, n_heads=2, memory_depth=2,
               memory_expansion=2, chunk_size=4, segment_len=8, window=6, n_persistent=2)
    cfg.update(kw)
    return TitansLM(TitansConfig(**cfg)).to(dtype).eval()


@pytest.mark.parametrize("variant,use_memory", [("mac", True), ("mac", False), ("mag", True), ("mal", True),
                                                ("lmm", True)])
def test_streamed_losses_equal_whole_sequence(variant, use_memory):
    model = _model(variant, use_memory=use_memory)
    tokens = torch.randint(0, 61, (2, 54), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_correct = whole_sequence_losses(model, tokens)
    for piece_len in (3, 8, 13, 100):  # unaligned, aligned, longer than the input
        loss, correct = token_losses(model, tokens, piece_len)
        assert loss.shape == (2, 53)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
        assert torch.equal(correct, ref_correct)


def test_state_size_does_not_grow_with_length():
    model = _model("mag", dtype=torch.float32)
    sizes = {}
    for n_pieces in (2, 8, 32):
        tokens = torch.randint(0, 61, (1, 16 * n_pieces + 1))
        *_, last = iter_stream(model, tokens, 16)
        sizes[n_pieces] = state_nbytes(last.state)
    assert sizes[2] > 0 and sizes[2] == sizes[8] == sizes[32], sizes


def test_measured_memory_stays_flat_while_streaming():
    """Resident memory measured along a longer stream: after warm-up it must not follow the token
    count (keeping one attention key/value pair per token would add 2 x 128 x 4 B = 1 KiB per
    token, ~24 MiB over the 24k tokens between the two measurements)."""
    model = _model("mag", dtype=torch.float32, d_model=128, n_layers=1, vocab_size=64, window=64, chunk_size=64)
    # short pieces keep each call's temporaries small, so allocator noise stays ~1 MiB
    points = stream_benchmark(model, 40_960, 256, [8_192, 16_384, 40_960])
    assert [p.tokens for p in points] == [8_192, 16_384, 40_960]
    assert len({p.state_bytes for p in points}) == 1
    if points[0].rss_mib is None:
        pytest.skip("no /proc/self/status on this platform: RSS cannot be read")
    growth = points[-1].rss_mib - points[1].rss_mib  # points[0..1]: warm-up (allocator pools fill)
    peak_growth = points[-1].peak_rss_mib - points[1].peak_rss_mib
    assert growth < 8 and peak_growth < 8, f"RSS grew {growth:.1f} MiB (peak {peak_growth:.1f} MiB): {points}"
    # the same probe does see memory that is really kept (it is not blind)
    before = rss_bytes()
    kept = [torch.ones(1 << 20) for _ in range(40)]  # 160 MiB
    assert (rss_bytes() - before) / 2**20 > 80
    del kept


def test_position_bins_cover_every_position():
    for length in (1, 7, 64, 1000):
        bins = position_bins(length)
        assert bins[0][0] == 0 and bins[-1][1] == length
        assert all(a < b for a, b in bins) and all(b == c for (_, b), (c, _) in zip(bins, bins[1:]))
