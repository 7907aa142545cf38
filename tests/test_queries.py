"""Every analyst query in jobs/analyst.sql runs on two nights of a scored archive and says what it should."""

import datetime as dt

import numpy as np
import pytest

from anomaly_core import decode_heatmap
from anomaly_core.scoring import decode_grid, image_maps
from jobs.analyst import connect, load_queries, run_query

# every test reads the nightly audits scored through Ray
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def con(nightly_output):
    return connect(str(nightly_output[0]))


def test_the_sql_file_defines_the_documented_queries():
    assert list(load_queries()) == ["tonight_anomalies", "anomaly_rate_per_day_and_line", "error_images",
                                    "score_drift", "image_heatmap"]


def test_tonight_anomalies_are_ranked_within_product(con):
    rows = run_query(con, "tonight_anomalies", run_date="2026-11-22")
    assert rows and all(r["product"] == "brick" for r in rows)
    assert [r["rank_in_product"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)


def test_anomaly_rate_per_day_and_line(con):
    rows = run_query(con, "anomaly_rate_per_day_and_line")
    nights = (dt.date(2026, 11, 21), dt.date(2026, 11, 22))           # DuckDB types the partition DATE
    assert {(r["run_date"], r["line"]) for r in rows} == {(d, line) for d in nights for line in ("L1", "L2")}
    assert sum(r["scored"] for r in rows) == 20 and all(0 <= r["anomaly_rate"] <= 1 for r in rows)


def test_error_images_lists_the_broken_file_each_night(con):
    rows = run_query(con, "error_images")
    assert [r["uri"].rsplit("/", 1)[1] for r in rows] == ["broken.png", "broken.png"]
    assert all(r["error"] for r in rows)


def test_score_drift_compares_two_nights(con):
    rows = run_query(con, "score_drift", night_a="2026-11-21", night_b="2026-11-22")
    assert [str(r["run_date"]) for r in rows] == ["2026-11-21", "2026-11-22"]
    assert rows[0]["mean_score"] == pytest.approx(rows[1]["mean_score"])   # same archive, same model


def test_image_heatmap_rebuilds_the_map_from_its_grid(con):
    uri = run_query(con, "tonight_anomalies", run_date="2026-11-22")[0]["uri"]
    (row,) = run_query(con, "image_heatmap", uri=uri)
    grid = decode_grid(row["heatmap_grid"])                                        # [G, G] float16 values
    heat = decode_heatmap(row)
    assert heat.shape == (row["heatmap_size"],) * 2 == (112, 112) and row["heatmap_png"] is None
    np.testing.assert_allclose(heat, image_maps(grid[None], out_size=112, sigma=row["heatmap_sigma"])[0])
    assert grid.min() - 1e-6 <= heat.min() <= heat.max() <= grid.max() + 1e-6      # averages of the grid
