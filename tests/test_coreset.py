import numpy as np
import pytest

from anomaly_core.coreset import composable_greedy, coreset_size, greedy_kcenter, random_projection, select_coreset
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
    core = select_coreset(f, k=50, projection_dim=16, seed=0, partition_size=200, oversample=2, refine=0.1)
    brute = (1 - (f @ f[core.indices].T).max(1)).max()
    assert core.cover_radius == pytest.approx(brute, abs=1e-5)
    assert len(set(core.indices.tolist())) == 50


def test_full_coreset_has_zero_radius(rng):
    f = unit_rows(rng, 40, 16)
    assert select_coreset(f, k=40, projection_dim=8, seed=0, partition_size=100, oversample=2,
                          refine=0.1).cover_radius == pytest.approx(0, abs=1e-5)


def test_projection_preserves_distances_on_average(rng):
    x = rng.standard_normal((200, 384)).astype(np.float32)
    p = x @ random_projection(384, 128, seed=0)
    ratio = np.linalg.norm(p[:100] - p[100:], axis=1) / np.linalg.norm(x[:100] - x[100:], axis=1)
    assert abs(ratio.mean() - 1) < 0.05


@pytest.mark.parametrize("n,ratio,size,want", [(1000, 0.1, None, 100), (1000, 0.0001, None, 1),
                                               (10, 0.5, 30, 10), (1000, 0.1, 7, 7)])
def test_coreset_size(n, ratio, size, want):
    assert coreset_size(n, ratio=ratio, size=size) == want


def test_one_partition_is_plain_greedy(rng):
    x = rng.standard_normal((500, 8)).astype(np.float32)
    start = int(np.random.default_rng(3).integers(500))
    np.testing.assert_array_equal(composable_greedy(x, 40, partition_size=500, oversample=2, seed=3),
                                  greedy_kcenter(x, 40, start=start))


def clustered(rng, n=4000, d=16):
    centres = rng.standard_normal((60, d)) * 5
    return (centres[rng.integers(0, 60, n)] + rng.standard_normal((n, d))).astype(np.float32)


def radius(x, idx):
    return float(np.sqrt(((x[:, None, :] - x[None, idx, :]) ** 2).sum(-1).min(1).max()))


@pytest.mark.parametrize("refine", [0.0, 0.1])
def test_composable_selection_has_k_distinct_points_and_a_close_radius(rng, refine):
    x = clustered(rng)
    got = composable_greedy(x, 200, partition_size=512, oversample=2, seed=0, refine=refine)
    assert got.size == 200 and np.unique(got).size == 200
    plain = radius(x, greedy_kcenter(x, 200, start=0))
    limit = 4.0 if refine == 0 else 1.10                              # 4-approx bound; refined: within 10%
    assert radius(x, got) <= limit * plain


def test_partitions_can_run_through_any_map(rng):
    x = clustered(rng, n=2000)
    calls = []

    def recording_map(fn, items):
        items = list(items)
        calls.append(len(items))
        return [fn(i) for i in items]

    a = composable_greedy(x, 50, partition_size=300, oversample=2, seed=1, refine=0.1)
    b = composable_greedy(x, 50, partition_size=300, oversample=2, seed=1, refine=0.1, map_fn=recording_map)
    np.testing.assert_array_equal(a, b)
    assert calls == [7]


def test_extending_from_distances_continues_the_selection(rng):
    x = rng.standard_normal((300, 6)).astype(np.float32)
    full = greedy_kcenter(x, 30, start=5)
    first = full[:10]
    d = ((x[:, None] - x[None, first]) ** 2).sum(-1).min(1)
    np.testing.assert_array_equal(greedy_kcenter(x, 20, min_sq_dist=d), full[10:])
