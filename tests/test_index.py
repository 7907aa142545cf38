import numpy as np
import pytest

from anomaly_core.index import MemoryBank
from tests.conftest import unit_rows


def test_nearest_is_brute_force_cosine_distance(rng):
    bank, q = unit_rows(rng, 300, 32), unit_rows(rng, 1000, 32)
    want = 1 - (q @ bank.T).max(1)
    got = MemoryBank.build(bank).nearest(q, batch_size=128)          # several batches
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_exact_match_has_zero_distance(rng):
    bank = unit_rows(rng, 50, 16)
    assert MemoryBank.build(bank).nearest(bank).max() < 1e-5


def test_save_load_round_trip(tmp_path, rng):
    bank = MemoryBank.build(unit_rows(rng, 20, 8))
    bank.save(tmp_path / "b.faiss")
    q = unit_rows(rng, 5, 8)
    np.testing.assert_array_equal(MemoryBank.load(tmp_path / "b.faiss").nearest(q), bank.nearest(q))


def test_wrong_query_width_is_an_error(rng):
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        MemoryBank.build(unit_rows(rng, 5, 16)).nearest(unit_rows(rng, 5, 8))
