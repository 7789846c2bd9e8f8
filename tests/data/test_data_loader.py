"""ShardLoader in one process: layout, determinism, resume, validation, corrupt shards, checks."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from data_synthetic import make_dataset, sample_ids
from titans_pretrain.data.loader import IGNORE_INDEX, ShardLoader
from titans_pretrain.data.manifest import check_compatible, load_manifest
from titans_pretrain.data.shards import ShardError


def stream(loader, n):
    return [sample_ids(b) for b in itertools.islice(iter(loader), n)]


@pytest.fixture
def uneven(tmp_path):
    return make_dataset(tmp_path / "ds", [9, 4, 13, 6, 1, 7], [5, 6])  # 40 train, 11 val


def test_batches_shapes_and_shifted_labels(uneven):
    loader = ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (3, 7) and batch["labels"].shape == (3, 7)
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long


def test_epoch_covers_each_sample_at_most_once_and_counts_the_rest(uneven):
    loader = ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=1, shuffle_buffer=5)
    assert loader.steps_per_epoch == 13 and loader.dropped_per_epoch == 1
    ids = [i for b in stream(loader, 13) for i in b]
    assert len(set(ids)) == 39 and set(ids) <= set(range(40))
    assert (loader.epoch, loader.step) == (1, 0)  # the position moves to the next epoch at once


def test_workers_do_not_change_the_stream_and_epochs_reshuffle(uneven):
    ref = stream(ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=1, shuffle_buffer=5), 30)
    two = stream(ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=1, shuffle_buffer=5,
                             num_workers=2), 30)
    assert ref == two
    other_seed = stream(ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=1, seed=1,
                                    shuffle_buffer=5), 30)
    assert other_seed != ref
    assert ref[:13] != ref[13:26]  # epoch 1 is ordered differently from epoch 0
    flat0 = [i for b in ref[:13] for i in b]
    assert flat0 != sorted(flat0)  # shuffled inside the epoch


def test_labels_are_inputs_shifted(tmp_path):
    # A sample whose tokens are 0..seq_len: shifting is visible.
    from titans_pretrain.data.manifest import FORMAT_VERSION, Manifest, ShardInfo, SplitInfo, Totals, save_manifest
    from titans_pretrain.data.shards import ShardWriter
    import numpy as np
    w = ShardWriter(tmp_path / "train-00000.tar")
    for k in range(4):
        w.add(f"{k:09d}", np.arange(k, k + 6, dtype=np.uint16))
    info = w.close()
    m = Manifest(FORMAT_VERSION, "t.model", "", 300, 1, 2, 0, 5, "uint16",
                 {"train": SplitInfo([ShardInfo(info.file, info.samples, info.bytes, info.sha256)])},
                 Totals(), {}, "k", root=tmp_path)
    save_manifest(m, tmp_path)
    batch = next(iter(ShardLoader(tmp_path, batch_size=4, dp_rank=0, dp_size=1)))
    first = batch["input_ids"][:, 0]
    expected = torch.stack([torch.arange(int(k), int(k) + 6) for k in first])
    assert torch.equal(batch["input_ids"], expected[:, :-1])
    assert torch.equal(batch["labels"], expected[:, 1:])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(uneven, workers):
    kw = dict(batch_size=3, dp_rank=1, dp_size=2, shuffle_buffer=4, num_workers=workers)
    full = stream(ShardLoader(uneven, **kw), 20)  # 6 steps per epoch: crosses 3 epochs
    for cut in (0, 4, 6, 11):
        first = ShardLoader(uneven, **kw)
        head = stream(first, cut)
        state = first.state_dict()
        resumed = ShardLoader(uneven, **kw)
        resumed.load_state_dict(state)
        assert head + stream(resumed, 20 - cut) == full, f"resume at step {cut}"


def global_steps(uneven, dp_size, batch_size, steps, state=None, **kw):
    """The global batches (as sorted id lists) that dp_size ranks see over `steps` steps."""
    loaders = [ShardLoader(uneven, batch_size=batch_size, dp_rank=r, dp_size=dp_size,
                           global_batch=12, shuffle_buffer=7, **kw) for r in range(dp_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    accum = loaders[0].accum
    per_rank = [stream(loader, steps * accum) for loader in loaders]
    out = [sorted(i for rank in per_rank for b in rank[s * accum:(s + 1) * accum] for i in b)
           for s in range(steps)]
    return out, loaders[0].state_dict()


def test_global_batches_do_not_depend_on_the_layout_and_resume_on_another_size(uneven):
    """40 samples, global batch 12: 3 steps per epoch, 4 dropped; 7 steps cross two epochs."""
    ref, _ = global_steps(uneven, 1, 3, 7)
    assert all(len(b) == len(set(b)) == 12 for b in ref)
    assert len(set(ref[0] + ref[1] + ref[2])) == 36 and ref[:3] != ref[3:6]  # reshuffled per epoch
    for dp, batch in ((1, 12), (2, 2), (2, 6), (3, 4), (4, 3), (6, 1)):
        assert global_steps(uneven, dp, batch, 7)[0] == ref, (dp, batch)
    head, state = global_steps(uneven, 2, 3, 2)  # stopped mid-epoch on 2 ranks
    for dp, batch in ((1, 3), (4, 3), (2, 6)):
        assert head + global_steps(uneven, dp, batch, 5, state)[0] == ref, (dp, batch)


def test_a_rank_reads_only_the_shards_of_its_slice(tmp_path):
    manifest = make_dataset(tmp_path / "many", [8] * 32)  # 256 samples, one window
    shards = []
    for rank in range(4):
        loader = ShardLoader(manifest, batch_size=16, dp_rank=rank, dp_size=4, global_batch=64)
        ids = [i for b in stream(loader, 4) for i in b]
        shards.append({i // 8 for i in ids})
    assert set().union(*shards) == set(range(32))
    assert max(len(s) for s in shards) <= 12  # about 32 / 4, not all 32


def test_state_is_rank_independent_and_checked(uneven, tmp_path):
    a = ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=2)
    stream(a, 2)
    b = ShardLoader(uneven, batch_size=3, dp_rank=1, dp_size=2)
    b.load_state_dict(a.state_dict())
    assert (b.epoch, b.step) == (0, 2)

    with pytest.raises(ValueError, match="global_batch=6 but this loader has global_batch=12"):
        ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=4).load_state_dict(a.state_dict())
    inside = ShardLoader(uneven, batch_size=1, dp_rank=0, dp_size=2, global_batch=6)
    stream(inside, 1)  # one of three micro-batches of step 0
    with pytest.raises(ValueError, match="inside global step 0 .* only a step boundary resumes"):
        ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=2).load_state_dict(inside.state_dict())
    other = make_dataset(tmp_path / "other", [9, 4, 13, 6, 1, 8])
    with pytest.raises(ValueError, match="dataset changed"):
        ShardLoader(other, batch_size=3, dp_rank=0, dp_size=2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="multiple of batch_size"):
        ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=2, global_batch=9)


def test_a_version_1_state_resumes_at_an_epoch_boundary_only(uneven):
    loader = ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=2)
    v1 = {"version": 1, "split": "train", "epoch": 2, "step": 6, "seed": 0, "batch_size": 3,
          "dp_size": 2, "shuffle_buffer": 4096, "layout": loader._layout_id()}
    loader.load_state_dict(v1)  # the end of epoch 2 (40 // 6 = 6 steps) is the start of epoch 3
    assert (loader.epoch, loader.step) == (3, 0)
    with pytest.raises(ValueError, match=r"older version .* mid-epoch \(epoch 2, step 4 of 6\)"):
        loader.load_state_dict(dict(v1, step=4))


def test_validation_is_one_ordered_pass_per_iter(uneven):
    ranks = [ShardLoader(uneven, split="val", batch_size=2, dp_rank=r, dp_size=2) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 2  # 11 samples // (2 ranks * 2) = 2 steps, 3 dropped
    passes = [[i for b in r for i in sample_ids(b)] for r in ranks]
    assert passes == [[40, 41, 44, 45], [42, 43, 46, 47]]  # each step's slices, in manifest order
    assert [i for b in ranks[0] for i in sample_ids(b)] == passes[0]  # iterable again


def test_too_small_split_and_bad_arguments(uneven):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardLoader(uneven, split="val", batch_size=8, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        ShardLoader(uneven, batch_size=2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="on_corrupt"):
        ShardLoader(uneven, batch_size=2, dp_rank=0, dp_size=1, on_corrupt="ignore")
    with pytest.raises(ValueError, match="split 'test'"):
        ShardLoader(uneven, split="test", batch_size=2, dp_rank=0, dp_size=1)


def test_check_compatible(uneven):
    manifest = load_manifest(uneven)
    check_compatible(manifest, vocab_size=manifest.vocab_size, seq_len=7)
    check_compatible(manifest, vocab_size=manifest.vocab_size + 64, seq_len=7)  # padded vocab
    with pytest.raises(ValueError, match="smaller than the dataset tokenizer"):
        check_compatible(manifest, vocab_size=manifest.vocab_size - 1, seq_len=7)
    with pytest.raises(ValueError, match="seq_len=8 differs"):
        check_compatible(manifest, vocab_size=manifest.vocab_size, seq_len=8)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data: same size, different content
    path.write_bytes(bytes(data))


def test_corrupt_shard_errors_by_name_or_is_masked_and_counted(uneven):
    root = uneven.parent
    _flip_byte(root / "train-00002.tar")
    loader = ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=1)
    with pytest.raises(ShardError, match="train-00002.tar is corrupt"):
        stream(loader, 13)

    skip = ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=1, on_corrupt="skip")
    batches = list(itertools.islice(iter(skip), 13))
    masked_rows = [row for b in batches for row in range(3) if (b["labels"][row] == IGNORE_INDEX).all()]
    seen = Counter(i for b in batches for i, lab in zip(sample_ids(b), b["labels"][:, 0])
                   if lab != IGNORE_INDEX)
    assert skip.masked_samples == len(masked_rows) > 0
    assert not set(seen) & set(range(13, 26))  # nothing from the corrupt shard leaks through
    assert max(seen.values()) == 1


def test_missing_shard_errors_at_construction_or_is_left_out(uneven):
    (uneven.parent / "train-00003.tar").unlink()
    with pytest.raises(ShardError, match="train-00003.tar is missing"):
        ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=1)
    skip = ShardLoader(uneven, batch_size=3, dp_rank=0, dp_size=1, on_corrupt="skip")
    assert skip.skipped_shards == ["train-00003.tar"] and skip.samples == 34
    ids = [i for b in stream(skip, skip.steps_per_epoch) for i in b]
    assert len(ids) == len(set(ids)) == 33 and not set(ids) & set(range(26, 32))
