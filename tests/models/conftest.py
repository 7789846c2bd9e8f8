"""Tiny model configs shared by the model tests (fp64 where comparisons must be tight)."""
import pytest
import torch

from titans_pretrain.models import TitansConfig, TitansLM


def tiny_config(variant: str = "mac", **overrides) -> TitansConfig:
    """Small enough for milliseconds per call; T=37 spans several chunks (4), MAC segments (8)
    and attention windows (6), and none of them divides it."""
    kw = dict(variant=variant, vocab_size=53, d_model=32, n_layers=2, n_heads=2, memory_depth=2,
              memory_expansion=2, chunk_size=4, segment_len=8, window=6, n_persistent=2, conv_kernel=4)
    kw.update(overrides)
    return TitansConfig(**kw)


@pytest.fixture
def make_model():
    """``make_model(variant, dtype=torch.float64, seed=0, **config_overrides) -> TitansLM`` (eval mode)."""

    def make(variant: str = "mac", dtype=torch.float64, seed: int = 0, **overrides) -> TitansLM:
        torch.manual_seed(seed)
        return TitansLM(tiny_config(variant, **overrides)).to(dtype).eval()

    return make


@pytest.fixture
def make_config():
    """``make_config(variant, **overrides) -> TitansConfig`` (the sizes of :func:`tiny_config`)."""
    return tiny_config


@pytest.fixture
def single_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine a second thread
    only spins (measured: the learning + streaming tests take 150 s with 2 threads, 22 s with 1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
