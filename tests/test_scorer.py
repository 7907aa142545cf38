"""The score job's per-batch step, without Ray: one row per image, errors included."""

import numpy as np
import pytest

from anomaly_core.config import ModelConfig
from anomaly_core.decode import decode_batch
from anomaly_core.model import Model
from jobs.scorer import Scorer, path_label
from tests.helpers import png_bytes
from tests.test_model import parts, stained


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    Model.fit(parts(8, 0), config=ModelConfig(image_size=56, tiles=1, blocks=(5,), coreset_ratio=0.5),
              device="cpu").save(path)
    return path


def test_scorer_rows_without_ray(model_dir):
    blobs = [png_bytes(parts(1, 5)[0]), png_bytes(stained(6)), b"\x89PNG"]
    batch = decode_batch({"path": np.array(["n.png", "d.png", "x.png"], dtype=object),
                          "bytes": np.array(blobs, dtype=object)}, input_size=56)
    rows = Scorer(model_path=str(model_dir), device="cpu", run_id="r1", run_time="2026-11-22T01:00:00+00:00")(batch)
    assert list(rows["status"]) == ["ok", "ok", "error"]
    assert rows["score"][1] > rows["score"][0] and np.isnan(rows["score"][2])
    assert list(rows["verdict"]) == ["normal", "anomalous", "error"] and rows["heatmap_png"][2] is None
    assert rows["run_date"][0] == "2026-11-22" and len(set(map(len, rows.values()))) == 1


def test_product_and_line_come_from_hive_folders():
    uri = "s3://archive/product=plate/line=3/2026-11-22/a.png"
    assert (path_label(uri, "product"), path_label(uri, "line")) == ("plate", "3")
    assert path_label("s3://archive/a.png", "line") == ""
