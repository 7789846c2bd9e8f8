"""Padded batches equal one sequence at a time, for every variant, left and right padding, over the
prompt and through decoding (fp64): each row's chunk and segment boundaries are its own."""
from __future__ import annotations

import pytest
import torch

from titans_pretrain.models import TitansConfig, TitansLM
from titans_pretrain.models.generation import forward_padded

# chunk 4, segment 8, window 6: the prompts (5, 11, 14 tokens) end mid-chunk and mid-segment at
# different offsets, so every row closes its chunks and segments at its own decoding steps
SMALL = dict(vocab_size=48, d_model=24, n_layers=2, n_heads=2, chunk_size=4, segment_len=8, window=6,
             n_persistent=2, memory_expansion=2, theta_max=0.3)
LENGTHS = (5, 11, 14)


def model_for(variant: str) -> TitansLM:
    torch.manual_seed(0)
    model = TitansLM(TitansConfig(variant=variant, **SMALL)).double().eval()
    with torch.no_grad():  # off the init values (unit norm scales, zero biases): every path matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def padded_batch(side: str, pad_id: int = 7):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, SMALL["vocab_size"], (n,), generator=g) for n in LENGTHS]
    T = max(LENGTHS)
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, cols], mask[b, cols] = r, 1
    return rows, ids, mask


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_at_a_time(variant, side):
    model = model_for(variant)
    rows, ids, mask = padded_batch(side)
    with torch.no_grad():
        logits, _ = forward_padded(model, ids, mask, piece_len=4)  # pieces: the streaming path too
        new = model.generate(ids, 9, attention_mask=mask)
        for b, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(logits[b][mask[b].bool()], alone, rtol=0, atol=1e-12)
            assert (logits[b][~mask[b].bool()] == 0).all()
            assert torch.equal(new[b], model.generate(row[None], 9)[0]), (b, side)
        # the pad token's value is irrelevant: another pad id changes nothing
        _, other, _ = padded_batch(side, pad_id=30)
        torch.testing.assert_close(forward_padded(model, other, mask)[0], logits, rtol=0, atol=1e-12)


def test_padded_states_continue_exactly():
    """A padded call's per-row states continue each sequence as if it had run whole, alone."""
    model = model_for("mac")
    rows, ids, mask = padded_batch("left")
    g = torch.Generator().manual_seed(5)
    more = torch.randint(0, SMALL["vocab_size"], (len(rows), 6), generator=g)
    with torch.no_grad():
        _, states = forward_padded(model, ids, mask)
        cont, _ = forward_padded(model, more, torch.ones_like(more), states)
        tokens, states2 = model.generate(ids, 4, attention_mask=mask, return_state=True)
        after = model.generate(more[:, :1], 3, state=states2)
        for b, row in enumerate(rows):
            whole = model(torch.cat((row, more[b]))[None]).logits[0]
            torch.testing.assert_close(cont[b], whole[len(row):], rtol=0, atol=1e-12)
            alone = model.generate(torch.cat((row, model.generate(row[None], 4)[0], more[b, :1]))[None], 3)
            assert torch.equal(after[b], alone[0])


def test_padding_errors_name_the_cause():
    model = model_for("mag")
    rows, ids, mask = padded_batch("left")
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\].*no real token"):
        model.generate(ids, 2, attention_mask=mask)
    with pytest.raises(ValueError, match="must match input_ids"):
        forward_padded(model, ids, mask[:, 1:])
    _, state = model.generate(ids[:, -2:], 1, return_state=True)
    with pytest.raises(ValueError, match="per-row states"):
        model.generate(ids, 1, attention_mask=torch.cat((mask[:, :-1], mask[:, -1:] * 0), 1), state=state)
