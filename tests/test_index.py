import logging

import faiss
import numpy as np
import pytest
import torch

from anomaly_core.index import (
    AUTO_FLAT_MAX,
    MemoryBank,
    TorchFlatSearch,
    choose_index,
    faiss_search,
    set_search_threads,
)
from tests.helpers import as_stored, stored_rounding, unit_rows


def test_nearest_is_brute_force_cosine_distance(rng):
    bank, q = unit_rows(rng, 300, 32), unit_rows(rng, 1000, 32)
    want = 1 - (q @ bank.T).max(1)
    got, _ = faiss_search(MemoryBank.build(bank).shards, q, batch_size=128)     # several batches
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
    else:                                          # stored vectors, maybe missed: never closer than their rounding
        assert (got >= exact - stored_rounding(kind)).all() and np.median(got - exact) < 0.02


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


def real_shaped(rng, n_bank: int, n_query: int, d: int = 384, *, clusters: int = 64):
    """Bank and queries shaped like patch features: unit rows around shared directions (normal patches
    lie near many bank entries, so nearest neighbours are close calls, as in real banks)."""
    centres = unit_rows(rng, clusters, d)

    def around(n):
        x = centres[rng.integers(0, clusters, n)] + 0.6 * unit_rows(rng, n, d)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return around(n_bank), around(n_query)


def unambiguous(bank: np.ndarray, q: np.ndarray, margin: float) -> np.ndarray:
    """[N] bool: the best entry beats the second by more than `margin` in similarity."""
    top2 = np.sort(q @ bank.T, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > margin


def test_torch_search_equals_faiss_flat_on_random_data(rng):
    bank, q = unit_rows(rng, 700, 32), unit_rows(rng, 500, 32)
    faiss_bank = MemoryBank.build(bank)
    want_d, want_i = faiss_bank.search(q)
    engine = TorchFlatSearch([bank[:300], bank[300:]], device="cpu", dtype=torch.float32,
                             workspace_bytes=64 * 100 * 4, bank_chunk=100)     # 64 queries x 100 entries
    got_d, got_i = engine.search(q)
    np.testing.assert_allclose(got_d, want_d, atol=1e-5)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(want_i, (q @ bank.T).argmax(1))                # brute force


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_placed_bank_equals_faiss_flat_on_real_shaped_data(dtype, atol, rng):
    """Two images' worth of 28 x 28 patches against a bank of three shards, on the path a GPU scorer
    takes (float16 is the GPU's precision), run on the CPU."""
    bank, q = real_shaped(rng, 3000, 2 * 784)
    want_d, want_i = MemoryBank.build(bank, shard_size=1024).search(q)
    placed = MemoryBank.build(bank, shard_size=1024).place("cpu", engine="torch", dtype=dtype)
    assert placed.search_path == f"torch cpu {str(dtype).removeprefix('torch.')} flat"
    got_d, got_i = placed.search(q)
    np.testing.assert_allclose(got_d, want_d, atol=atol)
    clear = unambiguous(bank, q, margin=2 * atol)
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(got_i[clear], want_i[clear])


def test_cpu_device_searches_with_faiss_and_says_so(rng, caplog):
    bank = MemoryBank.build(unit_rows(rng, 50, 8))
    with caplog.at_level(logging.INFO, logger="anomaly_core.index"):
        bank.place("cpu")
    assert bank.search_path == "faiss cpu flat" and "faiss cpu flat" in caplog.text


def test_bank_over_the_memory_budget_falls_back_to_faiss_with_a_warning(rng, caplog):
    bank, q = unit_rows(rng, 200, 16), unit_rows(rng, 20, 16)
    placed = MemoryBank.build(bank)
    with caplog.at_level(logging.WARNING, logger="anomaly_core.index"):
        placed.place("cpu", engine="torch", memory_budget=1024)
    assert placed.search_path == "faiss cpu flat"
    assert "FAISS searches it on the CPU instead" in caplog.text and "200 x 16" in caplog.text
    np.testing.assert_allclose(placed.nearest(q), 1 - (q @ bank.T).max(1), atol=1e-5)


def test_ivfpq_bank_stays_on_faiss_with_a_warning(rng, caplog):
    bank = MemoryBank.build(unit_rows(rng, 500, 16), kind="ivfpq")
    with caplog.at_level(logging.WARNING, logger="anomaly_core.index"):
        bank.place("cpu", engine="torch")
    assert bank.search_path == "faiss cpu ivfpq" and "index ivfpq" in caplog.text


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_bank_placed_on_a_device_is_searched_exactly(kind, rng):
    bank, q = unit_rows(rng, 3000, 32), unit_rows(rng, 200, 32)
    placed = MemoryBank.build(bank, kind=kind, shard_size=1000, ef_search=1, nprobe=1).place(
        "cpu", engine="torch", dtype=torch.float32)
    assert placed.search_path == "torch cpu float32 flat"
    got_d, got_i = placed.search(q)
    sims = q @ as_stored(bank, kind).T                                   # brute force [200, 3000]
    np.testing.assert_array_equal(got_i, sims.argmax(1))
    np.testing.assert_allclose(got_d, 1 - sims.max(1), atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_search_misses_neighbours_the_exact_search_finds(kind, rng):
    """The premise of the test above: with ef_search=1 / nprobe=1 the index's own search is approximate."""
    bank, q = unit_rows(rng, 3000, 32), unit_rows(rng, 200, 32)
    _, own_i = MemoryBank.build(bank, kind=kind, shard_size=1000, ef_search=1, nprobe=1).search(q)
    assert (own_i != (q @ bank.T).argmax(1)).any()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_rows_beyond_exact_above_are_searched_exactly_and_the_others_left_as_found(kind, rng):
    bank, q = unit_rows(rng, 3000, 32), unit_rows(rng, 400, 32)
    own_d, own_i = MemoryBank.build(bank, kind=kind, shard_size=1000, ef_search=1, nprobe=1).search(q)
    bound = float(np.median(own_d))
    got_d, got_i = MemoryBank.build(bank, kind=kind, shard_size=1000, ef_search=1, nprobe=1,
                                    exact_above=bound).search(q)
    sims = q @ as_stored(bank, kind).T                                   # brute force [400, 3000]
    far = own_d > bound
    assert (own_i[far] != sims[far].argmax(1)).any()                     # the index alone missed some of them
    np.testing.assert_array_equal(got_i[far], sims[far].argmax(1))
    np.testing.assert_allclose(got_d[far], 1 - sims[far].max(1), atol=1e-5)
    np.testing.assert_array_equal(got_i[~far], own_i[~far])
    np.testing.assert_array_equal(got_d[~far], own_d[~far])


@pytest.mark.parametrize("bound", [-0.1, 2.5])
def test_exact_above_must_be_a_cosine_distance(bound, rng):
    with pytest.raises(ValueError, match=r"exact_above=.*\[0, 2\]"):
        MemoryBank.build(unit_rows(rng, 50, 8), kind="hnsw", exact_above=bound)


@pytest.mark.parametrize("kind, path", [("hnsw", "faiss cpu hnsw float16, exhaustive above 0.2500"),
                                        ("ivf", "faiss cpu ivf, exhaustive above 0.2500"),
                                        ("flat", "faiss cpu flat")])
def test_search_path_names_the_exhaustive_bound_of_an_approximate_bank(kind, path, rng):
    assert MemoryBank.build(unit_rows(rng, 400, 16), kind=kind, exact_above=0.25).search_path == path


def test_unknown_engine_lists_choices(rng):
    with pytest.raises(ValueError, match="torch"):
        MemoryBank.build(unit_rows(rng, 5, 8)).place("cpu", engine="cupy")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_kind_is_read_from_the_shards(kind, rng):
    assert MemoryBank.build(unit_rows(rng, 400, 16), kind=kind).kind == kind


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_index_is_flat_up_to_the_device_threshold_then_hnsw(device):
    limit = AUTO_FLAT_MAX[device]
    assert choose_index(limit, device=device) == "flat"
    assert choose_index(limit + 1, device=device) == "hnsw"


def test_auto_index_names_the_devices_it_knows():
    with pytest.raises(ValueError, match="cpu"):
        choose_index(10, device="mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_placement_equals_faiss_flat(rng):
    bank, q = real_shaped(rng, 3000, 2 * 784)
    want = MemoryBank.build(bank).nearest(q)
    placed = MemoryBank.build(bank).place("cuda")
    assert "cuda" in placed.search_path
    np.testing.assert_allclose(placed.nearest(q), want, atol=2e-3)


def test_a_float32_hnsw_bank_fitted_before_float16_storage_still_searches_exactly_beyond_the_bound(rng):
    bank, q = unit_rows(rng, 2000, 32), unit_rows(rng, 300, 32)
    shard = faiss.IndexHNSWFlat(32, 32, faiss.METRIC_INNER_PRODUCT)                # what "hnsw" built before
    shard.add(bank)
    old = MemoryBank([faiss.deserialize_index(faiss.serialize_index(shard))], ef_search=1, exact_above=0.0)
    assert (old.kind, old.search_path) == ("hnsw", "faiss cpu hnsw, exhaustive above 0.0000")
    got_d, got_i = old.search(q)
    sims = q @ bank.T                                                    # brute force [300, 2000], float32
    np.testing.assert_array_equal(got_i, sims.argmax(1))
    np.testing.assert_allclose(got_d, 1 - sims.max(1), atol=1e-5)
