import numpy as np
import pytest

from anomaly_core.coreset import composable_coreset, coreset_size, greedy_kcenter, random_projection, select_coreset
from tests.helpers import unit_rows


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
    brute = (1 - (f @ core.features.T).max(1)).max()
    assert core.cover_radius == pytest.approx(brute, abs=1e-5)
    assert np.unique(core.features, axis=0).shape[0] == 50 and core.n_points == 500


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
    f = unit_rows(rng, 500, 8)
    core = select_coreset(f, k=40, projection_dim=8, seed=3, partition_size=500, oversample=2, refine=0.1)
    np.testing.assert_array_equal(core.features, f[greedy_kcenter(f, 40, start=0)])


def clustered(rng, n=4000, d=16):
    centres = rng.standard_normal((60, d)) * 5
    x = centres[rng.integers(0, 60, n)] + rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def radius(x, centres):
    return float(np.sqrt(((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1).min(1).max()))


def test_composable_selection_has_k_distinct_points_and_a_close_radius(rng):
    x = clustered(rng)
    got = select_coreset(x, k=200, projection_dim=16, seed=0, partition_size=512, oversample=2,
                         refine=0.2).features
    assert got.shape == (200, 16) and np.unique(got, axis=0).shape[0] == 200
    assert radius(x, got) <= 1.10 * radius(x, x[greedy_kcenter(x, 200, start=0)])


def test_refinement_covers_what_the_composition_misses(rng):
    x = clustered(rng)
    kw = dict(k=200, projection_dim=16, seed=0, partition_size=512, oversample=2)
    refined, plain = select_coreset(x, refine=0.1, **kw), select_coreset(x, refine=0.0, **kw)
    assert radius(x, refined.features) < radius(x, plain.features)


def test_partitions_can_be_any_handle_and_run_through_any_map(rng):
    """What the fit job does with Ray blocks: partitions are opaque handles that only the map's workers
    turn into rows; three passes (round 1, refinement, radius); same result as the in-memory slices."""
    x = clustered(rng, n=2000)
    store = {f"block-{i}": x[s:s + 300] for i, s in enumerate(range(0, 2000, 300))}
    calls = []

    def recording_map(fn, parts, *shared):
        calls.append(len(parts))
        return [fn(p, *shared) for p in parts]

    a = select_coreset(x, k=50, projection_dim=8, seed=1, partition_size=300, oversample=2, refine=0.1)
    b = composable_coreset(list(store), k=50, n_estimate=2000, dim=16, projection_dim=8, oversample=2,
                           refine=0.1, seed=1, points_of=store.__getitem__, map_fn=recording_map)
    np.testing.assert_array_equal(a.features, b.features)
    assert a.cover_radius == b.cover_radius and calls == [7, 7, 7]


def test_extending_from_distances_continues_the_selection(rng):
    x = rng.standard_normal((300, 6)).astype(np.float32)
    full = greedy_kcenter(x, 30, start=5)
    first = full[:10]
    d = ((x[:, None] - x[None, first]) ** 2).sum(-1).min(1)
    np.testing.assert_array_equal(greedy_kcenter(x, 20, min_sq_dist=d), full[10:])
