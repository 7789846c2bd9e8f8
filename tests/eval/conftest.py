"""Shared fixtures: a small sentencepiece tokenizer trained on the needle task's own text, and an
offline scratch Hugging Face cache (lm-eval's datasets, the export's remote code)."""

import pytest
import torch

from titans_pretrain.data.tokenizer import Tokenizer, train_tokenizer
from titans_pretrain.eval.needle_data import _tokenizer_texts


@pytest.fixture(scope="session")
def needle_tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "needle.model"
    train_tokenizer(_tokenizer_texts(0), path, vocab_size=512)
    return Tokenizer(path)


@pytest.fixture
def single_thread():
    """Tiny models: a second intra-op thread only spins on the shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session", autouse=True)
def offline_hf_home(offline_hf):
    """Every test here runs with the offline scratch Hugging Face cache."""
    return offline_hf
