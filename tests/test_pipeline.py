"""The per-batch callables, without Ray."""

import io

import numpy as np
import pytest
from PIL import Image

from anomaly_core.config import ModelConfig
from anomaly_core.index import MemoryBank
from anomaly_core.pipeline import (FeatureExtractor, Scorer, decode_batch, feature_blocks, fit_bank, score_features,
                                   split_holdout)
from anomaly_core.scoring import anomaly_maps
from tests.conftest import unit_rows


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_batch_keeps_bad_rows_with_an_error(rng):
    good = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    batch = {"path": np.array(["a.png", "b.png", "c.png"], dtype=object),
             "bytes": np.array([png(good), b"", b"garbage"], dtype=object)}
    out = decode_batch(batch, input_size=28)
    assert out["pixels"].shape == (3, 28, 28, 3) and "bytes" not in out
    assert list(out["error"] == "") == [True, False, False]
    assert (out["width"][0], out["height"][0]) == (40, 30)
    assert "empty" in out["error"][1] and len(out["content_sha256"][2]) == 64


def test_holdout_split_is_deterministic_and_order_free():
    paths = [f"img{i}.png" for i in range(20)]
    a = split_holdout(paths, fraction=0.2, seed=3)
    b = split_holdout(paths[::-1], fraction=0.2, seed=3)[::-1]
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 4


def test_holdout_needs_three_images():
    with pytest.raises(ValueError, match="at least 3 good images"):
        split_holdout(["a", "b"], fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def fitted_model(tmp_path_factory):
    """A model fitted in-process (no Ray) on crops of a real texture."""
    from anomaly_core.artifact import save_model
    from jobs.demo import _texture, make_part
    cfg = ModelConfig(image_size=56, tiles=1, blocks=(5,), coreset_ratio=0.5)
    rng = np.random.default_rng(0)
    tex = _texture("brick")
    parts = np.stack([np.repeat(make_part(tex, rng, size=56)[..., None], 3, 2) for _ in range(8)])
    ex = FeatureExtractor(config=cfg, device="cpu")
    feats = ex({"path": np.arange(8), "error": np.array([""] * 8, dtype=object), "pixels": parts})["features"]
    held = split_holdout([str(i) for i in range(8)], fraction=0.25, seed=0)
    bank, cal, stats = fit_bank(feature_blocks(feats, held, images_per_block=3), config=cfg,
                                n_estimate=int((~held).sum()) * cfg.grid_size ** 2)
    path = tmp_path_factory.mktemp("model") / "m"
    save_model(path, config=cfg, bank=bank, calibration=cal, weights=ex.backbone.identity, stats=stats)
    return path, tex


def test_scorer_rows_without_ray(fitted_model):
    from jobs.demo import _texture, add_defect, make_part
    path, tex = fitted_model
    rng = np.random.default_rng(5)
    normal = make_part(tex, rng, size=56)
    defect, _ = add_defect(make_part(tex, rng, size=56), "stain", rng, foreign=_texture("grass"))
    batch = decode_batch({"path": np.array(["n.png", "d.png", "x.png"], dtype=object),
                          "bytes": np.array([png(normal), png(defect), b"\x89PNG"], dtype=object)},
                         input_size=56)
    rows = Scorer(model_path=str(path), device="cpu", run_id="r1", run_time="2026-11-22T01:00:00+00:00")(batch)
    assert list(rows["status"]) == ["ok", "ok", "error"]
    assert rows["score"][1] > rows["score"][0] and np.isnan(rows["score"][2])
    assert rows["verdict"][2] == "error" and rows["heatmap_png"][2] is None
    assert rows["run_date"][0] == "2026-11-22" and len(set(map(len, rows.values()))) == 1


def test_scorer_refuses_other_weights(fitted_model, tmp_path):
    import json
    import shutil
    path, _ = fitted_model
    shutil.copytree(path, tmp_path / "m")
    mf = json.loads((tmp_path / "m" / "manifest.json").read_text())
    mf["weights"]["state_sha256"] = "0" * 64
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ValueError, match="refit"):
        Scorer(model_path=str(tmp_path / "m"), device="cpu")


def test_maps_are_the_patch_distances_upsampled_and_smoothed_at_the_scaled_sigma(rng):
    cfg = ModelConfig(image_size=56, tiles=2, tile_overlap=2, blocks=(7,))     # grid 6, input 84 px
    g, d = cfg.grid_size, 384
    bank = MemoryBank.build(unit_rows(rng, 50, d))
    feats = unit_rows(rng, 2 * g * g, d)                                        # [2 * G*G, D]
    _, maps = score_features(feats.reshape(2, g * g, d), bank, config=cfg)
    expected = anomaly_maps(bank.nearest(feats).reshape(2, g, g), out_size=cfg.input_size, sigma=cfg.map_sigma)
    assert cfg.map_sigma == pytest.approx(4 * 84 / 224)
    np.testing.assert_allclose(maps, expected, rtol=1e-6)
