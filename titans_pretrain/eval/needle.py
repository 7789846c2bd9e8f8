"""Synthetic needle-in-a-haystack tasks in the style of RULER's S-NIAH (single needle).

A sample is token ids: a haystack of repeated filler sentences, one *needle* sentence inserted at a
relative depth, then a question whose answer is the needle's value; the answer tokens end the
sample. Three tasks, as in RULER: ``passkey`` (a 5-digit pass key), ``number`` (a 7-digit "magic
number" for a key word) and ``word`` (a "magic word" for a key word). Key and value words are drawn
from the tokenizer's own vocabulary (pieces that are whole alphabetic words not used by the
templates, word-initial single pieces such as " maple" that never occur in the filler or the
templates), so the tasks work with any tokenizer and their answers cannot be copied from the
filler.

Every text part is encoded on its own and the ids are concatenated, so the answer's ids are
exactly the ids of the value inside the needle (no merge across a part boundary can change them),
and the haystack can be cut to an exact token length. Generation is a pure function of
``(seed, task, length, depth, index)``: the same call gives the same sample on every machine.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FILLER", "NeedleSample", "NeedleGenerator", "TASKS", "TaskSpec"]

# RULER's "noise" haystack: a few sentences repeated (a haystack the model cannot mistake for a needle).
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
          "There and back again. ")


@dataclass(frozen=True)
class TaskSpec:
    """Templates of one task. ``{key}``/``{value}`` are filled per sample; ``value_kind`` is
    ``"digits"`` (``digits`` random digits, the first non-zero) or ``"word"`` (a vocabulary word)."""

    name: str
    needle: str  # text before the value, the value, then `needle_end`
    needle_end: str
    question: str  # ends right before the answer
    value_kind: str
    digits: int = 0
    uses_key: bool = False


TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec("passkey", "The pass key is", ". Remember it. ", "What is the pass key? The pass key is",
                        "digits", digits=5),
    "number": TaskSpec("number", "One of the special magic numbers for {key} is:", ". ",
                       "What is the special magic number for {key} mentioned in the provided text? "
                       "The special magic number for {key} mentioned in the provided text is:",
                       "digits", digits=7, uses_key=True),
    "word": TaskSpec("word", "One of the special magic words for {key} is:", ". ",
                     "What is the special magic word for {key} mentioned in the provided text? "
                     "The special magic word for {key} mentioned in the provided text is:",
                     "word", uses_key=True),
}


class TokenizerLike(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class NeedleSample:
    """One task instance. ``ids[answer_start:]`` are the answer's ids; the model reads
    ``ids[:-1]`` and is scored on predicting every answer token (teacher forced, which equals
    greedy decoding of ``len(answer)`` tokens when all are right)."""

    task: str
    length: int
    depth: float
    ids: list[int]
    needle_start: int
    needle_len: int
    answer_start: int
    key: str
    value: str

    @property
    def answer(self) -> list[int]:
        return self.ids[self.answer_start:]


def _template_words() -> set[str]:
    text = " ".join(FILLER) + " ".join(t.needle + t.needle_end + t.question for t in TASKS.values())
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)}


class NeedleGenerator:
    """Builds needle samples with one tokenizer. ``min_word_len`` bounds the vocabulary words used
    as keys and word values; at least 8 such words must exist (else the word task is a guess)."""

    def __init__(self, tokenizer: TokenizerLike, seed: int = 0, min_word_len: int = 3):
        self.tokenizer, self.seed = tokenizer, seed
        self._cache: dict[str, list[int]] = {}
        banned = _template_words()
        template_ids = set(self._enc("".join(FILLER)))
        for spec in TASKS.values():
            template_ids.update(self._enc(spec.needle.format(key="")) + self._enc(spec.needle_end)
                                + self._enc("\n" + spec.question.format(key="")))
        words = set()
        for i in range(tokenizer.vocab_size):
            piece = tokenizer.decode([i])
            word = piece[1:]  # word-initial pieces only (" word"), not fragments of longer words
            if (piece.startswith(" ") and len(word) >= min_word_len and word.isascii() and word.isalpha()
                    and word.lower() not in banned and i not in template_ids and self._enc(piece) == [i]):
                words.add(word)
        self.words = sorted(words)
        sentences = [self._enc(s) for s in FILLER]
        self._filler: list[int] = [t for s in sentences for t in s]
        bounds, pos = [], 0
        for s in sentences:  # token offsets where a filler sentence starts, within one period
            bounds.append(pos)
            pos += len(s)
        self._bounds = bounds

    @property
    def filler_ids(self) -> list[int]:
        """One period of the haystack's filler, in ids."""
        return list(self._filler)

    def _enc(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tokenizer.encode(text))
        return self._cache[text]

    def _value(self, spec: TaskSpec, rng: random.Random) -> str:
        if spec.value_kind == "digits":
            return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(spec.digits - 1))
        return rng.choice(self._word_pool())

    def _word_pool(self) -> list[str]:
        if len(self.words) < 8:
            raise ValueError(f"the tokenizer has only {len(self.words)} whole-word pieces outside the task "
                             f"templates (need >= 8 for keys and word values); use the passkey task, or "
                             f"a tokenizer with a larger vocabulary")
        return self.words

    def min_length(self, task: str) -> int:
        """The shortest sample (no haystack) of ``task``, in tokens (an upper bound over keys)."""
        spec = TASKS[task]
        key = max(self._word_pool(), key=lambda w: len(self._enc(" " + w))) if spec.uses_key else ""
        value = "9" * spec.digits if spec.value_kind == "digits" else max(
            self._word_pool(), key=lambda w: len(self._enc(" " + w)))
        return sum(len(p) for p in self._parts(spec, key, value))

    def _parts(self, spec: TaskSpec, key: str, value: str) -> tuple[list[int], list[int], list[int]]:
        needle = self._enc(spec.needle.format(key=key)) + self._enc(" " + value) + self._enc(spec.needle_end)
        question = self._enc("\n" + spec.question.format(key=key))
        return needle, question, self._enc(" " + value)

    def sample(self, task: str, length: int, depth: float, index: int = 0) -> NeedleSample:
        """Sample ``index`` of the ``(task, length, depth)`` cell: exactly ``length`` tokens, the
        needle's start at fraction ``depth`` of the haystack (snapped to a filler sentence start)."""
        if task not in TASKS:
            raise ValueError(f"unknown needle task {task!r}; choose from {sorted(TASKS)}")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        spec = TASKS[task]
        rng = random.Random(f"{self.seed}:{task}:{length}:{depth!r}:{index}")
        key = rng.choice(self._word_pool()) if spec.uses_key else ""
        value = self._value(spec, rng)
        while value == key:  # the answer must not be readable off the question
            value = self._value(spec, rng)
        needle, question, answer = self._parts(spec, key, value)
        hay_len = length - len(needle) - len(question) - len(answer)
        if hay_len < 0:
            raise ValueError(f"length={length} is shorter than the {task} task's fixed part "
                             f"({length - hay_len} tokens); use a longer length")
        period = len(self._filler)
        haystack = (self._filler * (hay_len // period + 1))[:hay_len]
        starts = [p * period + b for p in range(hay_len // period + 1) for b in self._bounds] + [hay_len]
        target = depth * hay_len
        at = min((s for s in starts if s <= hay_len), key=lambda s: (abs(s - target), s))
        ids = haystack[:at] + needle + haystack[at:] + question + answer
        return NeedleSample(task=task, length=length, depth=depth, ids=ids, needle_start=at,
                            needle_len=len(needle), answer_start=len(ids) - len(answer), key=key, value=value)
