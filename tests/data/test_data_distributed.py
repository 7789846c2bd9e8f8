"""ShardLoader under real data parallelism: 2 gloo processes x 2 DataLoader workers, one launch.

Each rank runs every scenario and all-reduces once per step (a rank with fewer steps would hang
the launch, which the timeout turns into a failure); results come back through files.
"""
from __future__ import annotations

import itertools
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_synthetic import make_dataset, sample_ids
from titans_pretrain.data.loader import ShardLoader

WORLD = 2


def _epoch_with_collectives(loader) -> list[int]:
    ids = []
    for batch in itertools.islice(iter(loader), loader.steps_per_epoch):
        step = torch.ones(1)
        dist.all_reduce(step)  # every rank must reach every step
        assert step.item() == WORLD
        ids += sample_ids(batch)
    return ids


def _rank_main(rank: int, store_file: str, paths: dict, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_file, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    result = {}
    kw = dict(dp_rank=rank, dp_size=WORLD, num_workers=2)

    # Exactly once: 48 samples in uneven shards, 2 ranks x batch 4 -> 6 steps, nothing dropped.
    even = ShardLoader(paths["even"], batch_size=4, shuffle_buffer=8, **kw)
    result["even_steps"] = even.steps_per_epoch
    result["even_epoch0"] = _epoch_with_collectives(even)
    result["even_epoch1"] = _epoch_with_collectives(even)

    # Uneven shards whose total does not divide: equal steps, the remainder dropped and counted.
    uneven = ShardLoader(paths["uneven"], batch_size=3, shuffle_buffer=5, **kw)
    result["uneven_steps"] = uneven.steps_per_epoch
    result["uneven_dropped"] = uneven.dropped_per_epoch
    result["uneven_epoch0"] = _epoch_with_collectives(uneven)

    # Resume mid-epoch (and across the epoch boundary) equals the uninterrupted stream.
    full = [sample_ids(b) for b in itertools.islice(iter(ShardLoader(paths["even"], batch_size=4,
                                                                        **kw)), 15)]
    resumed_ok = []
    for cut in (3, 6, 8):
        first = ShardLoader(paths["even"], batch_size=4, **kw)
        head = [sample_ids(b) for b in itertools.islice(iter(first), cut)]
        state = first.state_dict()
        second = ShardLoader(paths["even"], batch_size=4, **kw)
        second.load_state_dict(state)
        tail = [sample_ids(b) for b in itertools.islice(iter(second), 15 - cut)]
        resumed_ok.append(head + tail == full)
    result["resume_equal"] = resumed_ok

    # Ordered validation: each step's slices in manifest order.
    val = ShardLoader(paths["even"], split="val", batch_size=2, **kw)
    result["val"] = [i for b in val for i in sample_ids(b)]

    dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    paths = {"even": str(make_dataset(root / "even", [10, 7, 13, 5, 13], [4, 5])),
             "uneven": str(make_dataset(root / "uneven", [9, 4, 13, 6, 1, 7]))}
    ctx = mp.spawn(_rank_main, args=(str(root / "store"), paths, str(root)), nprocs=WORLD,
                   join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):  # raises if a rank fails
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("the ranks did not finish in 120 s: a hang (unequal step counts?)")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_every_sample_exactly_once_per_epoch(results):
    assert [r["even_steps"] for r in results] == [6, 6]
    for epoch in ("even_epoch0", "even_epoch1"):
        ranks = [r[epoch] for r in results]
        assert not set(ranks[0]) & set(ranks[1])  # disjoint across ranks
        assert sorted(ranks[0] + ranks[1]) == list(range(48))  # exactly once
    assert results[0]["even_epoch0"] != results[0]["even_epoch1"]  # reshuffled per epoch


def test_uneven_shards_give_equal_steps_and_count_the_remainder(results):
    assert [r["uneven_steps"] for r in results] == [6, 6]
    assert [r["uneven_dropped"] for r in results] == [4, 4]
    ranks = [r["uneven_epoch0"] for r in results]
    assert len(ranks[0]) == len(ranks[1]) == 18
    assert len(set(ranks[0] + ranks[1])) == 36 and set(ranks[0] + ranks[1]) <= set(range(40))


def test_resume_mid_epoch_matches_uninterrupted_on_every_rank(results):
    for r in results:
        assert r["resume_equal"] == [True, True, True]


def test_validation_is_ordered_and_split_between_ranks(results):
    assert [r["val"] for r in results] == [[48, 49, 52, 53], [50, 51, 54, 55]]
