"""Shared fixtures: a small sentencepiece tokenizer trained on the needle task's own text, and an
offline scratch Hugging Face cache (lm-eval's datasets, the export's remote code)."""
import os

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
def offline_hf_home(tmp_path_factory):
    """No network, and nothing written to the user's Hugging Face cache."""
    home = tmp_path_factory.mktemp("hf_home")
    keys = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_MODULES_CACHE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      HF_MODULES_CACHE=str(home / "modules"))
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
