"""Every analyst query in jobs/analyst.sql runs on two nights of a scored archive (scored through Ray:
integration) or on a generated output with reviewers' labels, and says what it should."""

import datetime as dt
from collections import Counter

import numpy as np
import pytest

from anomaly_core import decode_heatmap
from anomaly_core.scoring import decode_grid, image_maps
from jobs.analyst import connect, load_queries, run_query
from jobs.labels import append_labels
from tests.scored_output import write_output

nightly = pytest.mark.integration         # reads the nightly audits scored through Ray


@pytest.fixture(scope="module")
def con(nightly_output):
    return connect(str(nightly_output[0]))


def test_the_sql_file_defines_the_documented_queries():
    assert list(load_queries()) == ["tonight_anomalies", "anomaly_rate_per_day_and_line", "error_images",
                                    "score_drift", "image_heatmap", "night_drift",
                                    "verdict_precision_per_night_and_line", "missed_defects"]


@nightly
def test_tonight_anomalies_are_ranked_within_product(con):
    rows = run_query(con, "tonight_anomalies", run_date="2026-11-22")
    assert rows and all(r["product"] == "brick" for r in rows)
    assert [r["rank_in_product"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)


@nightly
def test_anomaly_rate_per_day_and_line(con):
    rows = run_query(con, "anomaly_rate_per_day_and_line")
    nights = (dt.date(2026, 11, 21), dt.date(2026, 11, 22))           # DuckDB types the partition DATE
    assert {(r["run_date"], r["line"]) for r in rows} == {(d, line) for d in nights for line in ("L1", "L2")}
    assert sum(r["scored"] for r in rows) == 20 and all(0 <= r["anomaly_rate"] <= 1 for r in rows)


@nightly
def test_error_images_lists_the_broken_file_each_night(con):
    rows = run_query(con, "error_images")
    assert [r["uri"].rsplit("/", 1)[1] for r in rows] == ["broken.png", "broken.png"]
    assert all(r["error"] for r in rows)


@nightly
def test_score_drift_compares_two_nights(con):
    rows = run_query(con, "score_drift", night_a="2026-11-21", night_b="2026-11-22")
    assert [str(r["run_date"]) for r in rows] == ["2026-11-21", "2026-11-22"]
    assert rows[0]["mean_score"] == pytest.approx(rows[1]["mean_score"])   # same archive, same model


@nightly
def test_image_heatmap_rebuilds_the_map_from_its_grid(con):
    uri = run_query(con, "tonight_anomalies", run_date="2026-11-22")[0]["uri"]
    (row,) = run_query(con, "image_heatmap", uri=uri)
    grid = decode_grid(row["heatmap_grid"])                                        # [G, G] float16 values
    heat = decode_heatmap(row)
    assert heat.shape == (row["heatmap_size"],) * 2 == (112, 112) and row["heatmap_png"] is None
    np.testing.assert_allclose(heat, image_maps(grid[None], out_size=112, sigma=row["heatmap_sigma"])[0])
    assert grid.min() - 1e-6 <= heat.min() <= heat.max() <= grid.max() + 1e-6      # averages of the grid


# ---- labels joined to scores, and drift, on generated outputs ------------------------------------------------

@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """(connection, rows, {content_sha256: label}) of two generated nights; reviewers labelled every third
    flagged image (two of every three of those `defect`), then relabelled one, and labelled three passed
    images `defect`."""
    out = tmp_path_factory.mktemp("labelled") / "scores"
    rows = write_output(out, {"2026-11-21": 600, "2026-11-22": 600}, seed=4, defect_rate=0.1).to_pylist()
    flagged = [r for r in rows if r["verdict"] == "anomalous"][::3]
    labels = {r["content_sha256"]: ("defect" if i % 3 else "normal") for i, r in enumerate(flagged)}
    t0 = dt.datetime(2026, 11, 23, 7, tzinfo=dt.timezone.utc)
    append_labels(str(out), [{**r, "label": labels[r["content_sha256"]]} for r in flagged], reviewer="ana", now=t0)
    append_labels(str(out), [{**flagged[0], "label": "defect"}], reviewer="ben", now=t0 + dt.timedelta(hours=1))
    labels[flagged[0]["content_sha256"]] = "defect"                                        # the later label wins
    missed = [r for r in rows if r["verdict"] == "normal"][:3]
    append_labels(str(out), [{**r, "label": "defect", "comment": "hairline"} for r in missed], reviewer="ana", now=t0)
    labels.update({r["content_sha256"]: "defect" for r in missed})
    return connect(str(out)), rows, labels


def test_verdict_precision_per_night_and_line_counts_reviewed_flags(labelled):
    con, rows, labels = labelled
    got = {(str(r["run_date"]), r["line"]): r for r in run_query(con, "verdict_precision_per_night_and_line")}
    flagged = [r for r in rows if r["verdict"] == "anomalous"]
    keys = Counter((r["run_date"], r["line"]) for r in flagged)
    assert {k: v["flagged"] for k, v in got.items()} == dict(keys)
    for key in keys:
        mine = [labels.get(r["content_sha256"]) for r in flagged if (r["run_date"], r["line"]) == key]
        reviewed = [x for x in mine if x]
        row = got[key]
        assert (row["reviewed"], row["confirmed_defects"], row["false_alarms"]) == (
            len(reviewed), reviewed.count("defect"), reviewed.count("normal"))
        assert row["precision"] == pytest.approx(reviewed.count("defect") / len(reviewed), abs=5e-5)


def test_missed_defects_are_the_passed_images_labelled_defect(labelled):
    con, rows, labels = labelled
    got = run_query(con, "missed_defects")
    want = {r["uri"] for r in rows if r["verdict"] == "normal" and labels.get(r["content_sha256"]) == "defect"}
    assert {r["uri"] for r in got} == want and len(want) == 3
    assert all(r["comment"] == "hairline" and r["labelled_at_utc"] == dt.datetime(2026, 11, 23, 7) for r in got)


def test_night_drift_flags_the_night_whose_median_moved(tmp_path):
    out = tmp_path / "scores"
    rows = write_output(out, {"2026-11-20": 300, "2026-11-21": 300, "2026-11-22": 300},
                        shift={"2026-11-22": 0.1}, seed=5)
    got = run_query(connect(str(out)), "night_drift", nights=2, bound=0.25)
    assert [str(r["run_date"]) for r in got] == ["2026-11-21", "2026-11-22"]           # the last two nights
    for r in got:
        norm = np.array([x["score_normalised"] for x in rows.to_pylist() if str(x["run_date"]) == str(r["run_date"])])
        assert r["median"] == pytest.approx(np.median(norm), abs=1e-6)
        assert r["p95"] == pytest.approx(np.quantile(norm, 0.95), abs=1e-6)
        assert r["drifted"] == (abs(np.median(norm)) > 0.25)
    assert [r["drifted"] for r in got] == [False, True]                                  # a 0.1 shift = 0.5 units
