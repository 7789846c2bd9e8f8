"""The needle generator is deterministic, its samples have the asked length and depth, and their
answers are right; the scorer reads exactly the answer positions."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from titans_pretrain.eval.needle import TASKS, NeedleGenerator
from titans_pretrain.eval.needle_eval import score_samples


def _find(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_samples_are_deterministic_and_seed_dependent(needle_tokenizer, task):
    a = NeedleGenerator(needle_tokenizer, seed=3).sample(task, 300, 0.5, index=7)
    b = NeedleGenerator(needle_tokenizer, seed=3).sample(task, 300, 0.5, index=7)
    assert a == b
    others = {tuple(NeedleGenerator(needle_tokenizer, seed=s).sample(task, 300, 0.5, index=7).ids) for s in range(4, 10)}
    others |= {tuple(NeedleGenerator(needle_tokenizer, seed=3).sample(task, 300, 0.5, index=i).ids) for i in range(6)}
    assert len(others) >= 10, "seed and index must change the needle"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_are_correct(needle_tokenizer, task):
    tok, gen = needle_tokenizer, NeedleGenerator(needle_tokenizer, seed=0)
    spec = TASKS[task]
    for length in (gen.min_length(task), 200, 777):
        for depth in (0.0, 0.3, 1.0):
            s = gen.sample(task, length, depth, index=1)
            assert len(s.ids) == length
            assert tok.decode(s.answer) == " " + s.value
            if spec.value_kind == "digits":
                assert len(s.value) == spec.digits and s.value.isdigit() and s.value[0] != "0"
            else:
                assert s.value in gen.words
            needle = tok.decode(s.ids[s.needle_start:s.needle_start + s.needle_len])
            assert needle == spec.needle.format(key=s.key) + " " + s.value + spec.needle_end
            # the answer's ids occur in the context exactly once: inside the needle
            context = s.ids[:s.answer_start]
            hits = _find(context, s.answer)
            assert len(hits) == 1 and s.needle_start <= hits[0] < s.needle_start + s.needle_len
            question = tok.decode(s.ids[s.needle_start + s.needle_len:s.answer_start])
            assert question.endswith(spec.question.format(key=s.key))


def test_depth_places_the_needle(needle_tokenizer):
    gen = NeedleGenerator(needle_tokenizer, seed=0)
    starts = [gen.sample("passkey", 1000, d).needle_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts[0] == 0 and starts == sorted(starts) and len(set(starts)) == 5
    hay = 1000 - gen.min_length("passkey")
    for d, st in zip((0.25, 0.5, 0.75, 1.0), starts[1:]):
        assert abs(st - d * hay) <= 12, (d, st, hay)  # snapped to a filler sentence start


def test_errors_name_the_cause(needle_tokenizer):
    gen = NeedleGenerator(needle_tokenizer)
    with pytest.raises(ValueError, match="shorter than"):
        gen.sample("number", 10, 0.5)
    with pytest.raises(ValueError, match="unknown needle task"):
        gen.sample("nope", 100, 0.5)
    with pytest.raises(ValueError, match="depth"):
        gen.sample("passkey", 100, 1.5)


class _WordTokenizer:
    """Whitespace tokenizer with a tiny vocabulary: too few words for the word task."""

    vocab_size = 3

    def encode(self, text):
        return [0 for _ in text.split()]

    def decode(self, ids):
        return " ".join("ab" for _ in ids)


def test_word_task_needs_vocabulary_words():
    with pytest.raises(ValueError, match="whole-word pieces"):
        NeedleGenerator(_WordTokenizer()).sample("word", 100, 0.5)


# ---------------------------------------------------------------------------- scoring positions
@dataclass
class _Cfg:
    unit: int = 4
    vocab_size: int = 512


@dataclass
class _Out:
    logits: torch.Tensor
    state: int


class _OracleLM(nn.Module):
    """Predicts the true next token of known sequences (streaming position in its state); with
    ``spoil`` it is wrong at one absolute position (the prediction of that token index)."""

    def __init__(self, sequences, spoil=None):
        super().__init__()
        self.config = _Cfg()
        self.w = nn.Parameter(torch.zeros(1))
        self.seqs, self.spoil = sequences, spoil

    def forward(self, x, state=None, return_state=True):
        pos = state or 0
        B, T = x.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                target = self.seqs[b][pos + t + 1]
                if self.spoil is not None and pos + t + 1 == self.spoil[b]:
                    target = (target + 1) % self.config.vocab_size
                logits[b, t, target] = 1.0
        return _Out(logits, pos + T)


def test_scoring_reads_exactly_the_answer(needle_tokenizer):
    gen = NeedleGenerator(needle_tokenizer, seed=0)
    samples = [gen.sample("number", 120, 0.5, i) for i in range(3)]
    ids = [s.ids for s in samples]
    exact, tok_acc, _ = score_samples(_OracleLM(ids), samples, piece_len=7)
    assert exact == [True] * 3 and tok_acc == [1.0] * 3
    # wrong on the last answer token: not retrieved, (n - 1) / n of the answer tokens right
    last = [len(s.ids) - 1 for s in samples]
    exact, tok_acc, _ = score_samples(_OracleLM(ids, spoil=last), samples, piece_len=7)
    n = len(samples[0].answer)
    assert exact == [False] * 3 and tok_acc == pytest.approx([(n - 1) / n] * 3)
    # wrong on the token right before the answer (the question's last token): still retrieved
    before = [s.answer_start - 1 for s in samples]
    exact, _, _ = score_samples(_OracleLM(ids, spoil=before), samples, piece_len=7)
    assert exact == [True] * 3



def test_training_sequences_move_the_answer(needle_tokenizer):
    """Recipe data: exact length, a correct answer, and answer positions that vary (no shortcut)."""
    import random

    from titans_pretrain.eval.needle_data import training_sequence

    gen, rng = NeedleGenerator(needle_tokenizer, seed=0), random.Random(0)
    ends = set()
    for i in range(20):
        ids, a, b = training_sequence(gen, "passkey", 129, rng, i)
        assert len(ids) == 129 and 0 < a < b <= 129
        value = needle_tokenizer.decode(ids[a:b]).strip()
        assert value.isdigit() and len(value) == 5 and len(_find(ids[:a], ids[a:b])) == 1
        ends.add(b)
    assert len(ends) >= 10
