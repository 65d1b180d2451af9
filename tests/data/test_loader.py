import datasets
import numpy as np
import pytest

from pjlm.data.loader import Batcher


@pytest.fixture(scope="module")
def packed():
    rng = np.random.default_rng(0)
    n, L = 50, 8
    return datasets.Dataset.from_dict({
        "tokens": rng.integers(0, 100, (n, L)).astype(np.int32), "segment_ids": np.ones((n, L), np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (n, 1)), "loss_mask": np.ones((n, L), np.float32)})


def test_resumed_iteration_equals_uninterrupted(packed):
    straight = [b for _, b in Batcher(packed, "packed", 8, 100, 0, seed=3).iterate(0, 20)]
    first = [b for _, b in Batcher(packed, "packed", 8, 100, 0, seed=3).iterate(0, 10)]
    resumed = [b for _, b in Batcher(packed, "packed", 8, 100, 0, seed=3).iterate(10, 10)]
    for a, b in zip(straight, first + resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other_seed = Batcher(packed, "packed", 8, 100, 0, seed=4).batch(0)
    assert not np.array_equal(other_seed["tokens"], straight[0]["tokens"])


def test_epochs_cover_the_data_and_reshuffle(packed):
    b = Batcher(packed, "packed", 8, 100, 0, seed=1)
    assert b.steps_per_epoch == 6
    epoch0 = np.concatenate([b.global_indices(s) for s in range(6)])
    epoch1 = np.concatenate([b.global_indices(s) for s in range(6, 12)])
    assert len(set(epoch0)) == 48 and not np.array_equal(epoch0, epoch1)


def test_process_slices_partition_the_global_batch(packed):
    whole = Batcher(packed, "packed", 8, 100, 0, seed=2)
    for step in (0, 7):
        parts = [Batcher(packed, "packed", 8, 100, 0, seed=2, process_index=p, process_count=4).batch(step)
                 for p in range(4)]
        for k, v in whole.batch(step).items():
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)


def test_buckets_are_chosen_globally():
    lengths = [3, 5, 9, 2, 4, 3, 7, 12]
    ds = datasets.Dataset.from_dict({"ids": [list(range(n)) for n in lengths], "mask": [[1] * n for n in lengths],
                                     "length": lengths})
    shapes = set()
    for p in range(2):
        b = Batcher(ds, "sft", 8, 100, 0, buckets=(4, 8, 16), process_index=p, process_count=2)
        shapes.add(b.batch(0)["tokens"].shape)
    assert shapes == {(4, 16)}, "every process pads to the bucket of the global batch's longest row"
    with pytest.raises(ValueError, match="exceeds the largest bucket 8"):
        Batcher(ds, "sft", 8, 100, 0, buckets=(4, 8))
    with pytest.raises(ValueError, match="data.batch_size=8 is not divisible by the 3 processes"):
        Batcher(ds, "sft", 8, 100, 0, buckets=(16,), process_count=3)
