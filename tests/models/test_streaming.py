"""Streaming: a sequence in pieces gives the logits of the whole (every variant), the state stays
bounded, and generate() with a state equals recomputing from scratch."""
import pytest
import torch

from titans_pretrain.models.generation import sample_next

pytestmark = pytest.mark.usefixtures("single_thread")

VARIANTS = ("mac", "mag", "mal", "lmm")
PIECES = (1, 3, 17, 2, 8, 1, 13)  # 45 tokens: unaligned with chunks (4), segments (8), window (6)


def _in_pieces(model, ids, pieces):
    state, parts, start = None, [], 0
    for n in pieces:
        out = model(ids[:, start:start + n], state=state, return_state=True)
        state, start = out.state, start + n
        assert out.logits.shape[1] == n
        parts.append(out.logits)
    return torch.cat(parts, dim=1), state


@pytest.mark.parametrize("variant, overrides", [(v, {}) for v in VARIANTS] + [
    ("mac", dict(segment_len=6, chunk_size=4)),  # chunk grid restarts inside every segment
    ("mac", dict(use_memory=False)), ("mag", dict(use_memory=False)),
    ("lmm", dict(per_chunk_gates=True, chunk_size=5)), ("mal", dict(memory_depth=3, window=1)),
])
def test_pieces_equal_whole(make_model, variant, overrides):
    model = make_model(variant, **overrides)
    torch.manual_seed(1)
    ids = torch.randint(0, 53, (2, sum(PIECES)))
    with torch.no_grad():
        whole = model(ids).logits
        pieces, state = _in_pieces(model, ids, PIECES)
        torch.testing.assert_close(pieces, whole, rtol=1e-10, atol=1e-11)
        one_by_one, _ = _in_pieces(model, ids, [1] * ids.shape[1])
        torch.testing.assert_close(one_by_one, whole, rtol=1e-10, atol=1e-11)
    c = model.config
    assert state.position + state.pending.shape[1] == ids.shape[1]
    assert state.position % c.unit == 0 and state.pending.shape[1] < c.unit


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_does_not_grow_with_length(make_model, variant):
    model = make_model(variant, dtype=torch.float32, n_layers=1)
    ids = torch.randint(0, 53, (1, 130))

    def numel(state):
        total = state.pending.numel()
        for b in state.blocks:
            if b.kv is not None:
                total += b.kv.k.numel() + b.kv.v.numel()
            if b.memory is not None:
                total += sum(t.numel() for t in b.memory.memory.weights + b.memory.memory.momentum)
                total += sum(t.numel() for t in b.memory.conv_tails.values())
        return total

    with torch.no_grad():
        sizes = []
        state = None
        for t in range(130):
            state = model(ids[:, t:t + 1], state=state, return_state=True).state
            if t in (39, 79, 119):  # same pending length (40, 80, 120 tokens: multiples of 8 and 4)
                sizes.append(numel(state))
    assert sizes[0] == sizes[1] == sizes[2]


def test_state_batch_mismatch_is_an_error(make_model):
    model = make_model("mag")
    state = model(torch.zeros(2, 3, dtype=torch.long), return_state=True).state
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(1, 3, dtype=torch.long), state=state, return_state=True)


def _from_scratch(model, ids, n, temperature=0.0, top_k=None, generator=None):
    seq = ids
    for _ in range(n):
        token = sample_next(model(seq).logits[:, -1], temperature, top_k, generator)
        seq = torch.cat((seq, token[:, None]), dim=1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_state_equals_recomputing(make_model, variant):
    model = make_model(variant)
    torch.manual_seed(2)
    prompt = torch.randint(0, 53, (2, 11))
    with torch.no_grad():
        greedy = model.generate(prompt, 14)
        assert greedy.shape == (2, 14)
        assert torch.equal(greedy, _from_scratch(model, prompt, 14))
        # continuing a state: prompt -> 5 tokens -> a new piece of prompt -> 6 more tokens
        first, state = model.generate(prompt, 5, return_state=True)
        extra = torch.randint(0, 53, (2, 3))
        second = model.generate(extra, 6, state=state)
        history = torch.cat((prompt, first, extra), dim=1)
        assert torch.equal(second, _from_scratch(model, history, 6))
        # sampling: same generator seed, same tokens as the from-scratch loop
        sampled = model.generate(prompt, 9, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
        ref = _from_scratch(model, prompt, 9, 0.8, 5, torch.Generator().manual_seed(7))
        assert torch.equal(sampled, ref)
        assert torch.equal(model.generate(prompt, 4, temperature=1.3, top_k=1), greedy[:, :4])


def test_sample_next_respects_top_k_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 2, g).item() for _ in range(200)}
    assert draws == {1, 3}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0)
