import numpy as np
import pytest

from anomaly_core.coreset import (
    composable_coreset,
    continue_coreset,
    coreset_size,
    greedy_kcenter,
    random_projection,
    select_coreset,
)
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


def test_ratio_one_keeps_every_row_without_selecting(rng, monkeypatch):
    # keeping all N rows needs no greedy pass (an N x N one would be hours for a full bank)
    monkeypatch.setattr("anomaly_core.coreset.greedy_kcenter", lambda *a, **k: pytest.fail("greedy ran"))
    f = unit_rows(rng, 500, 16)
    core = select_coreset(f, ratio=1.0, projection_dim=8, seed=0, partition_size=100, oversample=2, refine=0.1)
    np.testing.assert_array_equal(core.features, f)
    assert core.cover_radius == 0.0 and core.n_points == 500


def test_continuing_a_ratio_one_bank_keeps_every_new_row_without_selecting(rng, monkeypatch):
    monkeypatch.setattr("anomaly_core.coreset.greedy_kcenter", lambda *a, **k: pytest.fail("greedy ran"))
    centres, new = unit_rows(rng, 30, 16), unit_rows(rng, 200, 16)
    ext = continue_coreset([new[:120], new[120:]], centres, radius=0.0, ratio=1.0, oversample=2)
    np.testing.assert_array_equal(ext.features, new)
    assert ext.cover_radius == 0.0 and ext.n_points == ext.n_candidates == 200


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


def test_greedy_stops_once_every_point_is_covered_within_until(rng):
    x = rng.standard_normal((300, 6)).astype(np.float32)
    full = greedy_kcenter(x, 300, start=0)
    # the squared radius after 12 centres (float32 rounding aside): greedy with that bound stops there
    d = ((x[:, None] - x[None, full[:12]]) ** 2).sum(-1).min(1)
    np.testing.assert_array_equal(greedy_kcenter(x, 100, start=0, until=float(d.max()) + 1e-4), full[:12])


def brute_continuation(new, centres, *, radius, ratio, max_added=None):
    """Greedy k-center from `centres` over the new rows farther than `radius` (cosine) from all of them,
    up to ceil(ratio x those rows) picks (at most max_added) or until all lie within squared distance
    2 x radius (cosine distance radius)."""
    new, centres = new.astype(np.float64), centres.astype(np.float64)
    cand = new[1 - (new @ centres.T).max(1) > radius]
    budget = int(np.ceil(ratio * len(cand))) if max_added is None else min(max_added, int(np.ceil(ratio * len(cand))))
    d = ((cand[:, None] - centres[None]) ** 2).sum(-1).min(1)
    chosen = []
    while len(chosen) < budget and d.max() > 2 * radius:
        chosen.append(int(np.argmax(d)))
        d = np.minimum(d, ((cand - cand[chosen[-1]]) ** 2).sum(-1))
    return cand[chosen].astype(np.float32)


def bank_and_new(rng, d=16):
    """40 fitted centres, and 300 new rows: 100 close to the centres, 200 elsewhere."""
    centres = unit_rows(rng, 40, d)
    near = centres[rng.integers(0, 40, 100)] + 0.05 * rng.standard_normal((100, d)).astype(np.float32)
    new = np.concatenate([near / np.linalg.norm(near, axis=1, keepdims=True), unit_rows(rng, 200, d)])
    return centres, new[rng.permutation(300)]


@pytest.mark.parametrize("partition", [300, 70])
def test_continuation_picks_what_greedy_from_the_old_centres_picks_among_the_candidates(rng, partition):
    centres, new = bank_and_new(rng)
    parts = [new[s:s + partition] for s in range(0, 300, partition)]
    # oversample x ratio >= 1: no partition's share binds, so the result is the one-pass greedy's
    ext = continue_coreset(parts, centres, radius=0.3, ratio=0.125, oversample=8)
    want = brute_continuation(new, centres, radius=0.3, ratio=0.125)
    n_cand = int((1 - (new @ centres.T).max(1) > 0.3).sum())
    assert len(want) == int(np.ceil(0.125 * n_cand))             # the budget binds before the radius
    np.testing.assert_array_equal(ext.features, want)
    assert ext.n_points == 300 and ext.n_candidates == n_cand


def test_the_budget_is_the_ratio_of_the_candidates_capped_by_max_added(rng):
    centres, new = bank_and_new(rng)
    ext = continue_coreset([new], centres, radius=0.3, ratio=0.125, max_added=7, oversample=2)
    np.testing.assert_array_equal(ext.features, brute_continuation(new, centres, radius=0.3, ratio=0.125,
                                                                   max_added=7))
    assert len(ext.features) == 7


def test_continuation_reports_the_exact_cover_radius_of_the_new_rows(rng):
    centres, new = bank_and_new(rng)
    ext = continue_coreset([new], centres, radius=0.3, ratio=0.1, oversample=2)
    bank = np.concatenate([centres, ext.features]).astype(np.float64)
    assert ext.cover_radius == pytest.approx((1 - (new @ bank.T).max(1)).max(), abs=1e-5)


def test_continuation_adds_nothing_where_the_bank_already_covers(rng):
    centres, _ = bank_and_new(rng)
    near = centres + 0.01 * rng.standard_normal(centres.shape).astype(np.float32)
    ext = continue_coreset([near / np.linalg.norm(near, axis=1, keepdims=True)], centres, radius=0.3, ratio=0.5,
                           oversample=2)
    assert ext.features.shape == (0, 16) and ext.n_candidates == 0 and ext.cover_radius < 0.3


def test_continuation_stops_at_the_radius_before_the_budget(rng):
    centres, _ = bank_and_new(rng)
    # one new kind of patch, far from the bank, in a tight cluster: one centre covers it
    blob = unit_rows(rng, 1, 16) + 0.01 * rng.standard_normal((200, 16)).astype(np.float32)
    ext = continue_coreset([blob / np.linalg.norm(blob, axis=1, keepdims=True)], centres, radius=0.3, ratio=0.25,
                           oversample=2)
    assert ext.n_candidates == 200 and len(ext.features) == 1 and ext.cover_radius < 0.3
