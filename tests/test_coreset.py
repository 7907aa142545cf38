import numpy as np
import pytest

from anomaly_core.coreset import coreset_size, greedy_kcenter, random_projection, select_coreset
from tests.conftest import unit_rows


def brute_greedy(x, k, start):
    chosen = [start]
    for _ in range(k - 1):
        d = ((x[:, None, :] - x[None, chosen, :]) ** 2).sum(-1).min(1)
        chosen.append(int(np.argmax(d)))
    return np.array(chosen)


def test_greedy_matches_brute_force(rng):
    x = rng.standard_normal((300, 8)).astype(np.float32)
    np.testing.assert_array_equal(greedy_kcenter(x, 25, start=7), brute_greedy(x.astype(np.float64), 25, 7))


def test_greedy_picks_every_cluster_before_repeating(rng):
    centres = np.eye(5, dtype=np.float32) * 100
    x = np.concatenate([c + rng.standard_normal((40, 5)).astype(np.float32) for c in centres])
    chosen = greedy_kcenter(x, 5, start=0)
    assert sorted(set(chosen // 40)) == [0, 1, 2, 3, 4]


def test_cover_radius_is_exact_in_original_space(rng):
    f = unit_rows(rng, 500, 64)
    core = select_coreset(f, k=50, projection_dim=16, seed=0)
    brute = (1 - (f @ f[core.indices].T).max(1)).max()
    assert core.cover_radius == pytest.approx(brute, abs=1e-5)
    assert len(set(core.indices.tolist())) == 50


def test_full_coreset_has_zero_radius(rng):
    f = unit_rows(rng, 40, 16)
    assert select_coreset(f, k=40, projection_dim=8, seed=0).cover_radius == pytest.approx(0, abs=1e-5)


def test_projection_preserves_distances_on_average(rng):
    x = rng.standard_normal((200, 384)).astype(np.float32)
    p = x @ random_projection(384, 128, seed=0)
    ratio = np.linalg.norm(p[:100] - p[100:], axis=1) / np.linalg.norm(x[:100] - x[100:], axis=1)
    assert abs(ratio.mean() - 1) < 0.05


@pytest.mark.parametrize("n,ratio,size,want", [(1000, 0.1, None, 100), (1000, 0.0001, None, 1),
                                               (10, 0.5, 30, 10), (1000, 0.1, 7, 7)])
def test_coreset_size(n, ratio, size, want):
    assert coreset_size(n, ratio=ratio, size=size) == want
