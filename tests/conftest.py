"""Fixtures shared across test folders."""
import os

import pytest


@pytest.fixture(scope="session")
def offline_hf(tmp_path_factory):
    """A scratch Hugging Face cache, offline: no network, and nothing written to the user's cache
    (the export's remote code is copied into $HF_HOME/modules, lm-eval looks for datasets there)."""
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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A prepared debug dataset shared by the subprocess training tests (a module that defines its
    own `data_dir` keeps its own)."""
    from titans_pretrain.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data")
    prepare_dataset(None, out, vocab_size=512, seq_len=32, default_corpus_bytes=1 << 20,
                    val_fraction=0.1, progress=False)
    return out
