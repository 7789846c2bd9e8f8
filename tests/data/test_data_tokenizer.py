"""The sentencepiece wrapper: fixed special ids, lossless round trips, deterministic training."""
from __future__ import annotations

import pytest

from titans_pretrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

TRAIN_TEXT = [
    "def forward(self, x):\n    return self.proj(x)  # the projection\n",
    "The neural memory learns at test time; surprise drives its updates.\n",
    "\tTabs\tand   repeated    spaces   stay.\n",
] * 200


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    train_tokenizer(TRAIN_TEXT, path, vocab_size=400)
    return Tokenizer(path)


def test_fixed_special_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 400


@pytest.mark.parametrize("text", [
    "plain ascii",
    "  leading and trailing spaces  ",
    "\ttabs\t\tand\n\nnewlines\r\n",
    "repeated      spaces    inside",
    "ünïcödé Ωμέγα 日本語 한국어 emoji 😀🚀 ﬁ ligature and NFKC-sensitive ① ｆｕｌｌ",
    "",
])
def test_round_trip_is_lossless(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_training_is_deterministic(tmp_path, tokenizer):
    again = train_tokenizer(TRAIN_TEXT, tmp_path / "again.model", vocab_size=400)
    assert again.read_bytes() == tokenizer.model_file.read_bytes()


def test_bad_vocab_sizes_and_missing_model(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(TRAIN_TEXT, tmp_path / "x.model", vocab_size=100)
    with pytest.raises(ValueError, match="smaller --vocab-size"):
        train_tokenizer(["tiny text"], tmp_path / "y.model", vocab_size=5000)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
