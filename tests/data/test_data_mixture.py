"""Mixtures (`weights=`): the realised mixture follows the weights, the stream does not depend on
the layout, resume is exact on another dp size, and per-source counts survive a resume."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from data_synthetic import make_dataset, sample_ids
from titans_pretrain.data.loader import ShardLoader

WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three sources of 60, 25 and 11 samples; source k's ids are k*1000 + i."""
    root = tmp_path_factory.mktemp("mix")
    return [make_dataset(root / "web", [20, 20, 20], [4], first_id=0),
            make_dataset(root / "code", [9, 16], [3], first_id=1000),
            make_dataset(root / "books", [11], [2], first_id=2000)]


def mixed(sources, dp_size=1, batch_size=4, steps=30, state=None, **kw):
    """Global batches (sorted ids) over `steps` steps on dp_size ranks, and rank 0's loader."""
    loaders = [ShardLoader(sources, weights=WEIGHTS, batch_size=batch_size, dp_rank=r,
                           dp_size=dp_size, global_batch=16, shuffle_buffer=8, **kw)
               for r in range(dp_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    accum = loaders[0].accum
    per_rank = [[sample_ids(b) for b in itertools.islice(iter(l), steps * accum)] for l in loaders]
    batches = [sorted(i for rank in per_rank for b in rank[s * accum:(s + 1) * accum] for i in b)
               for s in range(steps)]
    return batches, loaders[0]


def test_the_realised_mixture_follows_the_weights(sources):
    batches, loader = mixed(sources, steps=60)  # 960 samples: 10 mix epochs of 6 steps
    ids = np.array([i for b in batches for i in b])
    counts = np.bincount(ids // 1000, minlength=3)
    n = len(ids)
    for k, w in enumerate(WEIGHTS):
        sigma = (n * w * (1 - w)) ** 0.5
        assert abs(counts[k] - n * w) <= 3 * sigma + 1, (k, counts)
    assert loader.source_samples == counts.tolist()
    per_step = [np.bincount(np.array(b) // 1000, minlength=3) for b in batches]
    assert len({tuple(c) for c in per_step}) > 1  # drawn per sample, not a fixed pattern
    books = np.bincount(ids[ids >= 2000] - 2000)  # the small source wraps, a permutation per pass
    assert len(books) == 11 and books.max() - books.min() <= 1 and books.sum() == counts[2]


def test_mixture_is_layout_independent_and_resumes_on_another_size(sources):
    ref, _ = mixed(sources, steps=14)
    for dp, batch in ((2, 4), (4, 2), (2, 8)):
        assert mixed(sources, dp, batch, steps=14)[0] == ref
    head, stopped = mixed(sources, 2, 4, steps=5)
    state = stopped.state_dict()
    for dp in (1, 4):
        tail, resumed = mixed(sources, dp, 4 if dp == 1 else 2, steps=9, state=state)
        assert head + tail == ref
        full = np.bincount(np.array([i for b in ref for i in b]) // 1000, minlength=3)
        assert resumed.source_samples == full.tolist()


def test_mixture_checks(sources, tmp_path):
    _, loader = mixed(sources, steps=2)
    with pytest.raises(ValueError, match=r"mixture weights \[0.5, 0.3, 0.2\] but this loader has "
                                         r"\[0.2, 0.3, 0.5\]; resume with the same data.sources"):
        ShardLoader(sources, weights=WEIGHTS[::-1], batch_size=4, dp_rank=0, dp_size=1,
                    global_batch=16, shuffle_buffer=8).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight must be a positive number"):
        ShardLoader(sources[:2], weights=[1, 0], batch_size=4, dp_rank=0, dp_size=1)
    other = make_dataset(tmp_path / "long", [30], seq_len=9)
    with pytest.raises(ValueError, match=r"data.sources\[1\] .* has another seq_len .* 9 vs 7; "
                                         r"prepare every source with the same tokenizer"):
        ShardLoader([sources[0], other], weights=[1, 1], batch_size=4, dp_rank=0, dp_size=1)
    val = ShardLoader(sources, split="val", weights=WEIGHTS, batch_size=3, dp_rank=0, dp_size=1)
    first = [i for b in val for i in sample_ids(b)]
    assert first == [i for b in val for i in sample_ids(b)] and len(first) == 9
