"""The exported ONNX graph computes what Model.score computes: each torch step against the library's numpy
step on generated data, then the whole graph under onnxruntime against a small fitted model."""

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from anomaly_core.config import ModelConfig
from anomaly_core.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    ScoringGraph,
    bank_vectors,
    export_model,
    exportable,
    nearest_distance,
    stitch_index,
    tile_index,
)
from anomaly_core.features import describe_tokens
from anomaly_core.index import MemoryBank
from anomaly_core.model import Model
from anomaly_core.tiling import cut_tiles, stitch_tiles
from jobs.cli import main
from tests.helpers import as_stored, unit_rows
from tests.test_model import parts

# 2 x 2 tiles of 56 px overlapping by 2 patches (a 6 x 6 grid at 84 px), with every descriptor step the
# graph holds switched on.
CFG = ModelConfig(image_size=56, tiles=2, tile_overlap=2, blocks=(5,), coreset_ratio=0.5, neighbourhood=3,
                  position_weight=0.5)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def resized(images: np.ndarray, size: int) -> np.ndarray:
    from anomaly_core.images import resize_square
    return np.stack([resize_square(im, size) for im in images])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    m = Model.fit(resized(parts(8, 0), CFG.input_size), config=CFG, device="cpu")
    m.save(tmp_path_factory.mktemp("model") / "m")
    return m


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    """[3, 84, 84, 3] uint8: two normal parts and one with noise over its middle half."""
    images = resized(parts(3, 5), CFG.input_size)
    images[2, 21:63, 21:63] = np.random.default_rng(0).integers(0, 256, (42, 42, 3))
    return images


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_model(model, tmp_path_factory.mktemp("onnx") / "m.onnx")


def test_tiles_are_cut_and_stitched_by_gathers_of_the_library_functions_indices(rng):
    cfg = CFG
    s, t = cfg.input_size, cfg.tiles
    images = rng.integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    got = images.reshape(2, -1, 3)[:, tile_index(cfg)].reshape(2 * t * t, cfg.image_size, cfg.image_size, 3)
    np.testing.assert_array_equal(got, cut_tiles(images, tiles=t, tile_size=cfg.image_size, stride=cfg.tile_stride))
    tokens = rng.standard_normal((2 * t * t, cfg.tile_grid ** 2, 5)).astype(np.float32)
    np.testing.assert_array_equal(tokens.reshape(2, -1, 5)[:, stitch_index(cfg)],
                                  stitch_tiles(tokens, tiles=t, tile_grid=cfg.tile_grid, overlap=cfg.tile_overlap))


@pytest.mark.parametrize("neighbourhood, position_weight", [(1, 0.0), (3, 0.0), (5, 0.5), (1, 2.0)])
def test_descriptor_steps_equal_describe_tokens(rng, neighbourhood, position_weight):
    cfg = dataclasses.replace(CFG, neighbourhood=neighbourhood, position_weight=position_weight)
    graph = ScoringGraph(vit=torch.nn.Identity(), bank=unit_rows(rng, 4, 8), config=cfg, dtype=torch.float32)
    tokens = unit_rows(rng, 2 * cfg.grid_size ** 2, 8).reshape(2, -1, 8)
    got = graph.describe(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(got, describe_tokens(tokens, config=cfg)[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_the_banks_vectors_are_recovered_and_searched_exactly(rng, kind):
    vectors = unit_rows(rng, 400, 16)
    bank = MemoryBank.build(vectors, kind=kind, shard_size=150)
    got = bank_vectors(bank)
    assert got.shape == vectors.shape
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(as_stored(vectors, kind), axis=0))
    queries = unit_rows(rng, 50, 16)
    exact = MemoryBank.build(as_stored(vectors, kind), kind="flat").nearest(queries)
    np.testing.assert_allclose(nearest_distance(torch.from_numpy(queries), torch.from_numpy(got)).numpy(), exact,
                               atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"align": True}, "align=True"),
    ({"foreground_mask": True}, "foreground_mask=True"),
    ({"index": "ivfpq"}, "index='ivfpq'"),
])
def test_options_the_graph_cannot_express_are_refused_by_name(rng, change, message):
    cfg = dataclasses.replace(ModelConfig(), **{k: v for k, v in change.items() if k != "index"})
    bank = MemoryBank.build(unit_rows(rng, 2000, 16), kind=change.get("index", "flat"))
    with pytest.raises(ValueError, match=message):
        exportable(cfg, bank)


def test_the_graph_scores_as_model_score_with_the_same_verdicts(model, exported, test_images):
    ref = model.score(test_images)
    score, grid, amap = session(exported.path).run(None, {INPUT_NAME: test_images})
    assert (score.dtype, grid.dtype, amap.dtype) == (np.float32,) * 3
    assert grid.shape == ref.distances.shape and amap.shape == ref.maps.shape
    np.testing.assert_allclose(score, ref.scores, atol=1e-4)
    np.testing.assert_allclose(grid, ref.distances, atol=1e-4)
    np.testing.assert_allclose(amap, ref.maps, atol=1e-4)
    assert list(model.is_anomalous(score)) == list(model.is_anomalous(ref.scores)) == [False, False, True]


def test_a_graph_with_an_image_term_scores_as_model_score(test_images, tmp_path):
    cfg = dataclasses.replace(CFG, global_block=3)
    model = Model.fit(resized(parts(8, 0), cfg.input_size), config=cfg, device="cpu")
    model.save(tmp_path / "m")
    ref = model.score(test_images, maps=False)
    score, grid, _ = session(export_model(model, tmp_path / "m.onnx").path).run(None, {INPUT_NAME: test_images})
    np.testing.assert_allclose(grid, ref.distances, atol=1e-4)
    np.testing.assert_allclose(score, ref.scores, rtol=1e-3)
    assert list(model.is_anomalous(score)) == list(model.is_anomalous(ref.scores))


def test_the_graph_states_its_contract_and_threshold(model, exported):
    sess = session(exported.path)
    s, g = CFG.input_size, CFG.grid_size
    assert [(i.name, i.shape, i.type) for i in sess.get_inputs()] == [(INPUT_NAME, ["N", s, s, 3], "tensor(uint8)")]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == list(zip(OUTPUT_NAMES, [["N"], ["N", g, g], ["N", s, s]],
                                                                       strict=True))
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["model_id"] == model.model_id and float(meta["threshold"]) == model.calibration.threshold
    assert (meta["input_size"], meta["grid_size"]) == (str(s), str(g))


def test_an_fp16_graph_is_half_the_size_and_scores_close(model, exported, test_images, tmp_path):
    half = export_model(model, tmp_path / "h.onnx", dtype="fp16")
    assert half.bytes < 0.6 * exported.bytes
    score, grid, _ = session(half.path).run(None, {INPUT_NAME: test_images})
    ref = model.score(test_images, maps=False)
    # float16 weights and bank: distances move by about 1e-3 (bench/export.py reports them); loose bound
    np.testing.assert_allclose(grid, ref.distances, atol=1e-2)
    np.testing.assert_allclose(score, ref.scores, atol=1e-2)


def test_tensors_over_the_limit_go_to_one_external_file_beside_the_graph(model, exported, test_images, tmp_path):
    big = export_model(model, tmp_path / "big.onnx", external_data_threshold=1 << 20)
    assert big.external_data == str(tmp_path / "big.onnx.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 1 << 20
    onnx.checker.check_model(str(tmp_path / "big.onnx"))
    for a, b in zip(session(big.path).run(None, {INPUT_NAME: test_images}),
                    session(exported.path).run(None, {INPUT_NAME: test_images}), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_export_command_writes_the_graph_and_prints_its_facts(model, tmp_path):
    model_dir = tmp_path / "m"
    model.save(model_dir)
    result = CliRunner().invoke(main, ["export", str(model_dir), str(tmp_path / "m.onnx"), "--opset", "14"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout.splitlines()[-1])
    assert facts["model_id"] == model.model_id and facts["bank_size"] == model.bank.size
    assert facts["opset"] == "14" and facts["external_data"] is None
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == 14


def test_the_export_command_refuses_an_aligned_model_with_its_reason(model, tmp_path):
    aligned = Model(config=dataclasses.replace(CFG, align=True, position_weight=0.5), bank=model.bank,
                    calibration=model.calibration, weights=model.weights, stats=model.stats)
    aligned.save(tmp_path / "a")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), str(tmp_path / "a.onnx")])
    assert result.exit_code == 1 and "align=True" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "a.onnx").exists()
