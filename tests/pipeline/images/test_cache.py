"""The cache's gather: slices for consecutive rows, fancy indexing otherwise, into a given buffer or a new one."""
import numpy as np
import pytest

from pipeline.images import cache


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    data = {s: rng.integers(0, 256, (5, 8, 8), dtype=np.uint8) for s in (0, 1)}
    for s, images in data.items():
        cache.write_shard(tmp_path, 8, s, images)
    return tmp_path, data


@pytest.mark.parametrize("pairs", [
    [(0, 1), (0, 2), (0, 3)],                  # one run: a slice
    [(1, 4), (0, 0), (1, 2), (0, 1)],          # interleaved shards, rows out of order
    [(0, 3)], [(1, 0), (1, 1), (0, 4), (0, 2)],
])
def test_gather_matches_one_image_at_a_time(shards, pairs):
    root, data = shards
    shard, row = (np.array(v) for v in zip(*pairs))
    expected = np.stack([data[s][r] for s, r in pairs])
    np.testing.assert_array_equal(cache.gather(root, 8, shard, row), expected)
    out = np.zeros((len(pairs), 8, 8), dtype=np.uint8)
    assert cache.gather(root, 8, shard, row, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_gather_rejects_a_wrong_buffer(shards):
    root, _ = shards
    with pytest.raises(ValueError, match="out must be C-contiguous uint8"):
        cache.gather(root, 8, np.array([0, 0]), np.array([0, 1]), out=np.zeros((3, 8, 8), np.uint8))


def test_gather_names_a_row_past_the_end(shards):
    root, _ = shards
    with pytest.raises(IndexError, match="past the end"):
        cache.gather(root, 8, np.array([0]), np.array([5]))


def test_a_rewritten_shard_is_read_anew(tmp_path):
    first = np.full((2, 8, 8), 1, np.uint8)
    cache.write_shard(tmp_path, 8, 0, first)
    np.testing.assert_array_equal(cache.gather(tmp_path, 8, np.array([0]), np.array([1]))[0], first[1])
    (tmp_path / "size=8" / "shard-000000.u8").unlink()          # a home deleted and rebuilt in one process
    cache.write_shard(tmp_path, 8, 0, first + 1)
    np.testing.assert_array_equal(cache.gather(tmp_path, 8, np.array([0]), np.array([1]))[0], first[1] + 1)
