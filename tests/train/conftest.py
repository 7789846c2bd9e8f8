"""A prepared debug dataset shared by the subprocess training tests of this folder (a module that
defines its own `data_dir` keeps its own)."""
import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from titans_pretrain.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data")
    prepare_dataset(None, out, vocab_size=512, seq_len=32, default_corpus_bytes=1 << 20,
                    val_fraction=0.1, progress=False)
    return out
