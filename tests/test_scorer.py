"""The score job's per-batch step, without Ray: one row per image, errors included."""

import numpy as np
import pytest

from anomaly_core import decode_heatmap
from anomaly_core.config import ModelConfig
from anomaly_core.decode import decode_batch
from anomaly_core.model import Model
from anomaly_core.scoring import peak_locations
from anomaly_core.shards import tar_samples
from jobs.pack import run_pack
from jobs.scorer import Scorer, path_label
from tests.helpers import png_bytes
from tests.test_model import parts, stained

CFG = ModelConfig(image_size=56, tiles=1, blocks=(5,), coreset_ratio=0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    Model.fit(parts(8, 0), config=CFG, device="cpu").save(path)
    return path


@pytest.fixture(scope="module")
def aligned_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "aligned"
    Model.fit(parts(8, 0), config=ModelConfig(image_size=56, tiles=1, blocks=(5,), coreset_ratio=0.5, align=True),
              device="cpu").save(path)
    return path


def batch_of(images: list[np.ndarray], *, broken: bool = False) -> dict[str, np.ndarray]:
    blobs = [png_bytes(im) for im in images] + ([b"\x89PNG"] if broken else [])
    return decode_batch({"path": np.array([f"{i}.png" for i in range(len(blobs))], dtype=object),
                         "bytes": np.array(blobs, dtype=object)}, input_size=56)


def test_scorer_rows_without_ray(model_dir):
    batch = batch_of([parts(1, 5)[0], stained(6)], broken=True)
    rows = Scorer(model_path=str(model_dir), device="cpu", run_id="r1", run_time="2026-11-22T01:00:00+00:00")(batch)
    assert list(rows["status"]) == ["ok", "ok", "error"]
    assert rows["score"][1] > rows["score"][0] and np.isnan(rows["score"][2])
    assert list(rows["verdict"]) == ["normal", "anomalous", "error"] and rows["heatmap_grid"][2] is None
    assert rows["run_date"][0] == "2026-11-22" and len(set(map(len, rows.values()))) == 1


def test_rows_store_the_grid_and_no_png_by_default(model_dir):
    rows = Scorer(model_path=str(model_dir), device="cpu")(batch_of([stained(6)]))
    assert len(rows["heatmap_grid"][0]) == 2 * CFG.grid_size ** 2
    assert (rows["heatmap_size"][0], rows["heatmap_sigma"][0]) == (56, np.float32(CFG.map_sigma))
    assert rows["heatmap_pose"][0] is None and rows["heatmap_png"][0] is None and np.isnan(rows["heatmap_min"][0])


@pytest.mark.parametrize("aligned", [False, True])
def test_stored_row_rebuilds_the_map_the_model_computes_in_the_images_frame(aligned, model_dir,
                                                                              aligned_model_dir):
    """Aligned models score in the part's frame: the row's pose turns the rebuilt map back."""
    scorer = Scorer(model_path=str(aligned_model_dir if aligned else model_dir), device="cpu")
    batch = batch_of([stained(6), parts(1, 5)[0]])
    rows = scorer(batch)
    want = scorer.model.score(batch["pixels"])                                        # [2, 56, 56] maps
    assert (rows["heatmap_pose"][0] is not None) == aligned
    rounding = np.abs(want.distances - want.distances.astype(np.float16)).max()      # of the stored grid
    for i in range(2):
        row = {k: v[i] for k, v in rows.items()}
        assert np.abs(decode_heatmap(row) - want.maps[i]).max() <= rounding + 1e-6
    x, y = peak_locations(want.maps, widths=batch["width"], heights=batch["height"])
    np.testing.assert_array_equal(rows["peak_x"], x)
    np.testing.assert_array_equal(rows["peak_y"], y)


def test_png_heatmaps_are_an_option_and_decode_to_the_same_map(model_dir):
    rows = Scorer(model_path=str(model_dir), device="cpu", heatmap_png=True)(batch_of([stained(6)], broken=True))
    row = {k: v[0] for k, v in rows.items()}
    from_png = decode_heatmap(row | {"heatmap_grid": None})
    assert np.abs(from_png - decode_heatmap(row)).max() <= (row["heatmap_max"] - row["heatmap_min"]) / 510 + 1e-3
    assert rows["heatmap_png"][1] is None


def test_product_and_line_come_from_hive_folders():
    uri = "s3://archive/product=plate/line=3/2026-11-22/a.png"
    assert (path_label(uri, "product"), path_label(uri, "line")) == ("plate", "3")
    assert path_label("s3://archive/a.png", "line") == ""


def test_product_and_line_of_a_packed_archive_come_from_the_member_names_too(tmp_path):
    folder = tmp_path / "in" / "product=tile" / "line=L1"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    run_pack(str(tmp_path / "in"), str(tmp_path / "out"))
    ((uri, _, _),) = tar_samples("s3://shards/line=L9/shard-000000.tar",
                                 (tmp_path / "out" / "shard-000000.tar").read_bytes())
    assert uri == "s3://shards/line=L9/shard-000000.tar#product=tile/line=L1/0.png"
    assert (path_label(uri, "product"), path_label(uri, "line")) == ("tile", "L9")    # the shard's path first


def test_each_scorer_logs_its_device_index_and_search_path(model_dir, caplog):
    with caplog.at_level("INFO", logger="jobs.scorer"):
        scorer = Scorer(model_path=str(model_dir), device="cpu")
    assert scorer.model.bank.search_path == "faiss cpu flat"
    assert "backbone on cpu, bank index flat searched by faiss cpu flat" in caplog.text


def test_images_the_model_was_not_fitted_for_are_scored_but_never_called_normal(tmp_path):
    path = tmp_path / "sized"
    Model.fit(parts(8, 0), config=CFG, device="cpu", sizes=np.full((8, 2), 56)).save(path)
    part = parts(1, 5)[0]                                                    # [56, 56, 3], like the training parts
    tiny, strip = part[:20, :20], part[:14, :]                               # under 32 px; and 56 x 14 px
    big = np.repeat(np.repeat(part, 3, axis=0), 3, axis=1)                   # 168 px: 3x the training side
    rows = Scorer(model_path=str(path), device="cpu")(batch_of([part, tiny, strip, big]))
    assert list(rows["status"]) == ["ok", "warning", "warning", "warning"]
    assert list(rows["verdict"]) == ["normal", "review", "review", "review"]
    assert np.isfinite(rows["score"]).all() and all(g is not None for g in rows["heatmap_grid"])
    assert rows["error"][0] == "" and "under 32 px" in rows["error"][1] and "56-56 px" in rows["error"][3]
