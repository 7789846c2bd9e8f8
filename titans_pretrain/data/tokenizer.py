"""SentencePiece tokenizer: a thin wrapper with fixed special ids, and lossless BPE training.

The special ids are fixed for every tokenizer this project trains, so that the model, the packer
and the loader can rely on them without reading the model file:

    PAD = 0, BOS = 1, EOS = 2, UNK = 3

(then the 256 byte-fallback pieces, then the learned pieces). Training uses the identity
normalization, keeps whitespace as is and falls back to bytes for unseen characters, so that
`decode(encode(text)) == text` for every string (the sentencepiece defaults apply NFKC and collapse
whitespace, which loses information on code and unicode text).
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3

# sentencepiece silently skips training sentences longer than this (bytes); we split longer lines.
_MAX_SENTENCE_BYTES = 4096


class Tokenizer:
    """A sentencepiece model with the project's special ids exposed as attributes."""

    def __init__(self, model_file: str | Path, *, num_threads: int = 1):
        """`num_threads` applies to `encode_batch`; 1 by default because `prepare` parallelizes
        with processes (`--workers`), and sentencepiece would otherwise use every core."""
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist; pass an existing "
                                    f"sentencepiece .model file or let `prepare` train one")
        self.model_file = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path), num_threads=num_threads)
        self.vocab_size: int = int(self._sp.get_piece_size())
        self.bos_id: int = int(self._sp.bos_id())
        self.eos_id: int = int(self._sp.eos_id())
        self.pad_id: int = int(self._sp.pad_id())
        self.unk_id: int = int(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Documents -> the lines sentencepiece learns from (it treats each item as one sentence)."""
    for text in texts:
        for line in text.split("\n"):
            if not line:
                continue
            data = line.encode("utf-8")
            if len(data) <= _MAX_SENTENCE_BYTES:
                yield line
                continue
            for start in range(0, len(data), _MAX_SENTENCE_BYTES):
                piece = data[start:start + _MAX_SENTENCE_BYTES].decode("utf-8", errors="ignore")
                if piece:
                    yield piece


def train_tokenizer(texts: Iterable[str], output_file: str | Path, *, vocab_size: int) -> Path:
    """Train a lossless BPE model on `texts` (already a bounded sample) and write it to `output_file`.

    Deterministic: the same texts give a byte-identical model file (one training thread, no
    sentencepiece-side sampling: the caller bounds and seeds the sample).
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: 4 special ids and 256 byte pieces "
                         f"are always present; use at least 300 (typically 4096-32000)")
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            max_sentence_length=_MAX_SENTENCE_BYTES * 4,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        if "Vocabulary size" in str(exc) or "vocab_size" in str(exc):
            raise ValueError(f"the tokenizer training sample is too small for vocab_size="
                             f"{vocab_size} ({exc}); use a smaller --vocab-size or more text") from exc
        raise
    output = Path(output_file)
    output.write_bytes(buffer.getvalue())
    return output
