import faiss
import numpy as np
import pytest

from anomaly_core.index import MemoryBank, set_search_threads
from tests.helpers import unit_rows


def test_nearest_is_brute_force_cosine_distance(rng):
    bank, q = unit_rows(rng, 300, 32), unit_rows(rng, 1000, 32)
    want = 1 - (q @ bank.T).max(1)
    got = MemoryBank.build(bank).nearest(q, batch_size=128)          # several batches
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_exact_match_has_zero_distance(rng):
    bank = unit_rows(rng, 50, 16)
    assert MemoryBank.build(bank).nearest(bank).max() < 1e-5


def test_sharded_search_is_exact(rng):
    bank, q = unit_rows(rng, 1000, 16), unit_rows(rng, 300, 16)
    sharded = MemoryBank.build(bank, shard_size=128)
    assert len(sharded.shards) == 8 and sharded.size == 1000
    np.testing.assert_allclose(sharded.nearest(q), 1 - (q @ bank.T).max(1), atol=1e-5)


def test_save_load_round_trip_one_file_per_shard(tmp_path, rng):
    bank = MemoryBank.build(unit_rows(rng, 50, 8), shard_size=20)
    names = bank.save(tmp_path)
    assert names == ["bank-00000.faiss", "bank-00001.faiss", "bank-00002.faiss"]
    q = unit_rows(rng, 5, 8)
    np.testing.assert_array_equal(MemoryBank.load(tmp_path, names).nearest(q), bank.nearest(q))


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_approximate_kinds_find_near_neighbours(kind, rng):
    bank = unit_rows(rng, 4000, 32)
    q = bank[:200] + 0.05 * unit_rows(rng, 200, 32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = 1 - (q @ bank.T).max(1)
    got = MemoryBank.build(bank, kind=kind, nprobe=16).nearest(q)
    if kind == "ivfpq":                                              # quantised vectors: error both ways
        assert np.abs(got - exact).mean() < 0.15
    else:                                                            # exact vectors, maybe missed: never closer
        assert (got >= exact - 1e-5).all() and np.median(got - exact) < 0.02


def test_unknown_kind_lists_choices(rng):
    with pytest.raises(ValueError, match="flat"):
        MemoryBank.build(unit_rows(rng, 10, 8), kind="annoy")


def test_wrong_query_width_is_an_error(rng):
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        MemoryBank.build(unit_rows(rng, 5, 16)).nearest(unit_rows(rng, 5, 8))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_serialized_bank_searches_the_same(kind, rng):
    """What the fit job ships to its calibration tasks."""
    bank = MemoryBank.build(unit_rows(rng, 300, 16), kind=kind, shard_size=128)
    q = unit_rows(rng, 50, 16)
    np.testing.assert_array_equal(MemoryBank.deserialize(bank.serialize()).nearest(q), bank.nearest(q))


def test_search_threads_override_omp_num_threads():
    # Ray actors start with OMP_NUM_THREADS=1; the scorer hands FAISS the threads the backbone gets
    before = faiss.omp_get_max_threads()
    try:
        set_search_threads(3)
        assert faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(before)


def test_search_threads_must_be_positive():
    with pytest.raises(ValueError, match="got 0"):
        set_search_threads(0)
