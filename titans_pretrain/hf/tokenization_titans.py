"""``TitansTokenizer``: the project's sentencepiece model as a transformers tokenizer.

Copied as is into every exported folder (``tokenization_titans.py``); it imports only transformers
and sentencepiece. It calls sentencepiece directly, with no prefix-space or legacy handling, so
``encode`` gives exactly the ids the model was trained on (the project trains lossless BPE models:
identity normalisation, byte fallback, no dummy prefix) and ``decode(encode(text)) == text``.
No BOS/EOS is added by default, as in the training data pipeline.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class TitansTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, bos_token: str = "<s>", eos_token: str = "</s>",
                 unk_token: str = "<unk>", pad_token: str = "<pad>", **kwargs: Any):
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        kwargs.setdefault("add_bos_token", False)
        kwargs.setdefault("add_eos_token", False)
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         **kwargs)

    @property
    def vocab_size(self) -> int:
        return int(self.sp_model.get_piece_size())

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return int(self.sp_model.piece_to_id(token))

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces -> text; special tokens are written as their literal text (sentencepiece drops them)."""
        special = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode_pieces(run) + token)
                run = []
            else:
                run.append(token)
        return "".join(out) + self.sp_model.decode_pieces(run)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                         ) -> list[int]:
        """No special tokens are added: the model saw raw documents separated by EOS in training."""
        return list(token_ids_0) + (list(token_ids_1) if token_ids_1 else [])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
