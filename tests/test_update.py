"""Incremental update: the bank continued from its centres over new good images, the threshold
recalibrated, a new model that records its parent; the parent untouched, its training images never read."""

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest

from anomaly_core.config import ModelConfig
from anomaly_core.features import FeatureExtractor
from anomaly_core.index import MemoryBank
from anomaly_core.model import Model, score_features
from anomaly_core.update import extend_bank, merge_sizes
from tests.helpers import TEST_CONFIG_KW, as_stored, png_bytes, stored_rounding, unit_rows

CFG = ModelConfig(image_size=56, tiles=1, blocks=(5,), coreset_ratio=0.5)
WEIGHTS = {"source": "test", "state_sha256": "0" * 64}          # fitted from features: an identity to save


def tree_digest(path) -> dict[str, str]:
    """sha256 of every file under `path`, by relative name."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def clustered(rng, n: int, centre: np.ndarray, *, spread: float = 0.3) -> np.ndarray:
    """[n, 16, 384] unit rows around `centre` [384]: n images of one kind of patch."""
    x = centre + spread * rng.standard_normal((n, 16, 384)).astype(np.float32) / np.sqrt(384)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A model saved from features of 40 images of one kind (20% held out): (model, its folder)."""
    rng = np.random.default_rng(0)
    kinds = unit_rows(rng, 2, 384)
    train = clustered(rng, 40, kinds[0])
    model = Model.fit_features(train, config=dataclasses.replace(CFG, calibration="holdout"),
                               paths=[f"old{i}" for i in range(40)], weights=WEIGHTS)
    path = tmp_path_factory.mktemp("parent") / "m"
    model.save(path)
    model.old_kind, model.new_kind, model.train = kinds[0], kinds[1], train
    return model, path


def test_the_fit_records_every_calibration_score_beside_its_image(parent):
    model, _ = parent
    s = model.stats
    assert len(s.calibration_scores) == len(s.calibration_images) == s.n_calibration_images == 8
    assert model.calibration.normal_max == pytest.approx(max(s.calibration_scores))


def test_an_update_records_its_parent_and_what_it_added_and_leaves_the_parent_untouched(parent, tmp_path):
    model, path = parent
    before = tree_digest(path)
    new = clustered(np.random.default_rng(1), 10, model.new_kind)
    child = model.update_features(new, paths=[f"new{i}" for i in range(10)])
    manifest = child.save(tmp_path / "child")
    assert tree_digest(path) == before and Model.load(path).bank.size == model.bank.size
    loaded = Model.load(tmp_path / "child")
    assert manifest["parent"] == model.model_id == loaded.lineage["parent"]
    added = manifest["added"]
    assert sorted(added["images"]) == [f"new{i}" for i in range(10)] and added["patches"] == 8 * 16
    assert added["bank_size"] == [model.bank.size, loaded.bank.size] == [model.bank.size,
                                                                         model.bank.size + added["vectors"]]
    assert 0 < added["vectors"] <= added["candidates"] <= added["patches"]
    assert loaded.stats.n_images == 50 and loaded.stats.calibration_split == "holdout+holdout"


def test_an_update_keeps_the_alignment_trial_that_chose_its_parents_pose(parent):
    import copy

    from anomaly_core.fit import AlignmentTrial
    model, _ = parent
    trial = AlignmentTrial(images=32, unaligned=0.3, aligned=0.2)
    aligned_parent = copy.copy(model)
    aligned_parent.stats = dataclasses.replace(model.stats, alignment_trial=trial)
    child = aligned_parent.update_features(clustered(np.random.default_rng(1), 10, model.new_kind),
                                           paths=[f"new{i}" for i in range(10)])
    assert child.stats.alignment_trial == trial and child.config.align == model.config.align


def test_the_new_bank_keeps_every_old_entry_and_adds_the_new_kind(parent):
    model, _ = parent
    rng = np.random.default_rng(2)
    child = model.update_features(clustered(rng, 10, model.new_kind), paths=[f"new{i}" for i in range(10)])
    old = model.bank.vectors()
    np.testing.assert_array_equal(child.bank.vectors()[:len(old)], old)
    probe = clustered(rng, 4, model.new_kind).reshape(-1, 384)
    assert child.bank.nearest(probe).max() < model.bank.nearest(probe).min()


def test_images_the_bank_already_covers_add_nothing(parent):
    model, _ = parent
    old = model.bank.vectors()
    # new images made of the bank's own entries: no patch lies beyond the cover radius
    same = np.stack([old[i:i + 16] for i in range(0, 16 * 6, 16)])
    child = model.update_features(same, paths=[f"same{i}" for i in range(6)])
    assert child.lineage["added"]["candidates"] == 0 and child.bank.size == model.bank.size


def test_the_threshold_rests_on_the_parents_calibration_images_and_the_held_out_new_images(parent):
    model, _ = parent
    child = model.update_features(clustered(np.random.default_rng(3), 20, model.new_kind),
                                  paths=[f"new{i}" for i in range(20)])
    s = child.stats
    new_held = [n for n in s.calibration_images if n.startswith("new")]
    assert len(new_held) == 4 and child.calibration.n_images == 8 + 4
    assert s.calibration_images[:8] == model.stats.calibration_images
    assert s.n_train_images == model.stats.n_train_images + 16
    assert len(s.calibration_patches) == 12                   # kept for the next update's re-scoring


def test_a_parent_calibration_image_is_rescored_to_its_score_against_the_new_bank(parent):
    model, _ = parent
    # new images of the parent's own kind: the added vectors lie among its calibration images' patches
    child = model.update_features(clustered(np.random.default_rng(6), 20, model.old_kind),
                                  paths=[f"more{i}" for i in range(20)])
    rows = [int(n[3:]) for n in model.stats.calibration_images]
    direct = score_features(model.train[rows], child.bank, config=model.config, maps=False).scores
    np.testing.assert_allclose(child.stats.calibration_scores[:8], direct, atol=2e-4)    # float16 features
    assert (direct < np.array(model.stats.calibration_scores) - 5e-4).any()    # the recorded ones were bounds
    assert child.lineage["added"]["calibration"]["parent_exact"] == 8


def test_a_parent_saved_without_calibration_patches_updates_on_its_recorded_scores(parent, tmp_path, caplog):
    model, _ = parent
    old = Model(config=model.config, bank=model.bank, calibration=model.calibration, weights=WEIGHTS,
                stats=dataclasses.replace(model.stats, calibration_patches=None))
    old.save(tmp_path / "old")
    old = Model.load(tmp_path / "old")
    assert old.stats.calibration_patches is None
    with caplog.at_level("WARNING", logger="anomaly_core.update"):
        child = old.update_features(clustered(np.random.default_rng(6), 20, model.old_kind),
                                    paths=[f"more{i}" for i in range(20)])
    assert child.stats.calibration_scores[:8] == model.stats.calibration_scores
    assert "stores no calibration patches" in caplog.text
    assert child.stats.calibration_patches is None and child.lineage["added"]["calibration"]["parent_rescored"] == 0


def test_calibration_patches_are_saved_and_loaded_with_the_model(parent):
    model, path = parent
    loaded = Model.load(path).stats.calibration_patches
    for name in ("grids", "positions", "features"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model.stats.calibration_patches, name))


def test_the_update_adds_what_greedy_continued_to_half_the_parents_radius_adds(parent):
    from tests.test_coreset import brute_continuation
    model, _ = parent
    # two new images: none held out, one partition, so the update is exactly the one-pass greedy
    new = clustered(np.random.default_rng(8), 2, model.old_kind, spread=0.6)
    child = model.update_features(new, paths=["a", "b"])
    want = brute_continuation(new.reshape(-1, 384), model.bank.vectors(), radius=model.stats.cover_radius / 2,
                              ratio=model.config.coreset_ratio)
    assert len(want) > 0
    np.testing.assert_array_equal(child.bank.vectors()[model.bank.size:], want)
    assert child.lineage["added"]["stop_radius"] == model.stats.cover_radius / 2


def test_a_parent_calibration_image_added_again_no_longer_calibrates(parent):
    model, _ = parent
    again = model.stats.calibration_images[:2]
    child = model.update_features(clustered(np.random.default_rng(4), 2, model.new_kind), paths=again)
    assert not set(again) & set(child.stats.calibration_images) and child.calibration.n_images == 6


def test_a_parent_without_recorded_scores_needs_held_out_new_images(parent, tmp_path):
    model, _ = parent
    old = Model(config=model.config, bank=model.bank, calibration=model.calibration, weights=WEIGHTS,
                stats=dataclasses.replace(model.stats, calibration_scores=None))
    old.save(tmp_path / "old")
    new = clustered(np.random.default_rng(5), 2, model.new_kind)
    with pytest.raises(ValueError, match="at least 2 normal scores the new bank did not see"):
        old.update_features(new, paths=["a", "b"])
    child = old.update_features(clustered(np.random.default_rng(5), 10, model.new_kind),
                                paths=[f"n{i}" for i in range(10)])
    assert child.calibration.n_images == 2


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_extending_a_bank_keeps_its_kind_and_its_entries(rng, kind):
    old = unit_rows(rng, 300, 16)
    bank = MemoryBank.build(old, kind=kind, nprobe=64, ef_search=64)
    added = unit_rows(rng, 20, 16)
    grown = extend_bank(bank, added, config=dataclasses.replace(CFG, nprobe=64), exact_above=None)
    assert (grown.kind, grown.size, bank.size) == (kind, 320, 300)
    np.testing.assert_array_equal(grown.vectors()[:300], bank.vectors())
    if kind != "ivfpq":                                  # product quantisation stores codes, not the vectors
        d, ix = grown.search(added)
        np.testing.assert_array_equal(ix, np.arange(300, 320))
        np.testing.assert_allclose(d, 0, atol=stored_rounding(kind))
        np.testing.assert_array_equal(grown.vectors(), as_stored(np.concatenate([old, added]), kind))


def test_extending_a_full_shard_starts_new_ones(rng):
    bank = MemoryBank.build(unit_rows(rng, 10, 16), shard_size=4)
    grown = extend_bank(bank, unit_rows(rng, 7, 16), config=dataclasses.replace(CFG, shard_size=4), exact_above=None)
    assert [s.ntotal for s in grown.shards] == [4, 4, 4, 4, 1] and [s.ntotal for s in bank.shards] == [4, 4, 2]


def test_size_ranges_merge_to_cover_both():
    a = {"min_side": 100, "max_side": 200, "min_aspect": 1.0, "max_aspect": 1.5}
    b = {"min_side": 50, "max_side": 150, "min_aspect": 0.8, "max_aspect": 1.2}
    assert merge_sizes(a, b) == {"min_side": 50, "max_side": 200, "min_aspect": 0.8, "max_aspect": 1.5}
    assert merge_sizes(None, b) is None and merge_sizes(a, None) == a


def test_update_describes_only_the_new_images(tmp_path, monkeypatch):
    from tests.test_model import parts
    model = Model.fit(parts(6, 0), config=CFG, device="cpu")
    model.save(tmp_path / "m")
    described = []
    tokens = FeatureExtractor.tokens
    monkeypatch.setattr(FeatureExtractor, "tokens", lambda self, px: described.append(len(px)) or tokens(self, px))
    model.update(parts(3, 9), names=["a", "b", "c"])
    assert sum(described) == 3


def test_update_refuses_its_parent_as_the_new_model_before_any_work(parent):
    from jobs.update import run_update
    _, path = parent
    with pytest.raises(ValueError, match="never replaces its parent"):
        run_update(str(path), "anything", str(path))


def test_update_arguments_name_the_forms_the_command_takes():
    from jobs.update import update_arguments
    assert update_arguments(("good", "new"), from_labels=None) == ("good", "new")
    assert update_arguments(("new",), from_labels="out") == (None, "new")
    with pytest.raises(ValueError, match="MODEL --from-labels OUT NEW_MODEL"):
        update_arguments(("good", "new"), from_labels="out")


@pytest.mark.integration
def test_a_false_alarm_labelled_normal_scores_under_the_updated_threshold_and_a_defect_stays_above(
        ray_local, texture_dataset, tmp_path):
    """The issue's acceptance test: fit, audit, label a false alarm normal, `update --from-labels`, audit
    again. The training images are removed before the update: it never reads them."""
    from click.testing import CliRunner

    from jobs.cli import main
    from jobs.demo import _texture, make_part
    from jobs.fit import run_fit
    from jobs.labels import append_labels
    from jobs.score import run_score
    config = ModelConfig(**TEST_CONFIG_KW)
    train = tmp_path / "train"
    shutil.copytree(texture_dataset / "train" / "good", train)
    run_fit(str(train), str(tmp_path / "m"), config=config, batch_size=8)
    # a new supplier's part: gravel where the model has only seen brick; and one part with a drawn defect
    archive = tmp_path / "night"
    archive.mkdir()
    gravel = make_part(_texture("gravel"), np.random.default_rng(7), size=112)
    (archive / "new_supplier.png").write_bytes(png_bytes(np.repeat(gravel[..., None], 3, 2)))
    shutil.copy(sorted((texture_dataset / "test").glob("[!g]*/*.png"))[0], archive / "defect.png")
    out = tmp_path / "out"
    run_score(str(archive), str(tmp_path / "m"), str(out), batch_size=8, run_date="2026-12-01")
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in _rows(out)}
    assert rows["new_supplier.png"]["verdict"] == "anomalous" and rows["defect.png"]["verdict"] == "anomalous"
    append_labels(str(out), [{"content_sha256": rows["new_supplier.png"]["content_sha256"],
                              "uri": rows["new_supplier.png"]["uri"], "label": "normal"}], reviewer="qa")
    parent_files = tree_digest(tmp_path / "m")
    shutil.rmtree(train)
    result = CliRunner().invoke(main, ["update", str(tmp_path / "m"), "--from-labels", str(out),
                                       str(tmp_path / "m2"), "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    printed = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))
    assert printed["parent"] == json.loads((tmp_path / "m" / "manifest.json").read_text())["model_id"]
    assert tree_digest(tmp_path / "m") == parent_files
    out2 = tmp_path / "out2"
    run_score(str(archive), str(tmp_path / "m2"), str(out2), batch_size=8, run_date="2026-12-02")
    after = {r["uri"].rsplit("/", 1)[1]: r for r in _rows(out2)}
    threshold = printed["threshold"]
    assert after["new_supplier.png"]["score"] < threshold <= after["defect.png"]["score"]
    assert after["new_supplier.png"]["verdict"] == "normal" and after["defect.png"]["verdict"] == "anomalous"


def _rows(out) -> list[dict]:
    import duckdb
    return duckdb.sql(f"SELECT * FROM read_parquet('{out}/run_date=*/*.parquet')").df().to_dict("records")


@pytest.mark.integration
def test_an_update_from_shards_makes_the_model_an_update_from_the_same_images_as_files_makes(
        fitted_model_dir, tmp_path):
    """GOOD_IMAGES as a tar shard, as a Parquet table named by --image-column/--id-column (through the
    command), or as members of the shard labelled normal in a scored output, gives the new model that the
    same images as files give: same id, same bank. Labels may name files and members together."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from anomaly_core.shards import pack_tar
    from jobs.cli import main
    from jobs.demo import _texture, make_part
    from jobs.labels import append_labels
    from jobs.update import run_update
    parent, _ = fitted_model_dir
    rng = np.random.default_rng(11)
    # a new supplier's parts (gravel, where the parent has seen only brick): the bank grows
    images = {f"gravel{i}.png": png_bytes(np.repeat(make_part(_texture("gravel"), rng, size=112)[..., None], 3, 2))
              for i in range(4)}
    (tmp_path / "files").mkdir()
    for name, data in images.items():
        (tmp_path / "files" / name).write_bytes(data)
    (tmp_path / "tar").mkdir()
    (tmp_path / "tar" / "shard-000000.tar").write_bytes(pack_tar(sorted(images.items())))
    pq.write_table(pa.table({"png": list(images.values()), "name": list(images)}), tmp_path / "table.parquet")
    files = run_update(str(parent), str(tmp_path / "files"), str(tmp_path / "by_files"), batch_size=8)
    tar = run_update(str(parent), str(tmp_path / "tar"), str(tmp_path / "by_tar"), batch_size=8)
    result = CliRunner().invoke(main, ["update", str(parent), str(tmp_path / "table.parquet"),
                                       str(tmp_path / "by_parquet"), "--batch-size", "8",
                                       "--image-column", "png", "--id-column", "name"])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "by_parquet" / "manifest.json").read_text())
    assert files["added"]["vectors"] > 0
    assert tar["model_id"] == files["model_id"] == table["model_id"]
    assert tar["files"] == files["files"] == table["files"]                   # the bank's files, by sha256
    assert sorted(tar["added"]["images"]) == [f"{tmp_path}/tar/shard-000000.tar#{n}" for n in sorted(images)]
    assert sorted(table["added"]["images"]) == [f"{tmp_path}/table.parquet#{n}" for n in sorted(images)]

    def label_normal(out, uris):
        named = {u: images[u.replace("#", "/").rsplit("/", 1)[1]] for u in uris}       # file or member name
        append_labels(str(out), [{"content_sha256": hashlib.sha256(data).hexdigest(), "uri": u, "label": "normal"}
                                 for u, data in named.items()], reviewer="qa")

    members = sorted(tar["added"]["images"])
    label_normal(tmp_path / "out", members)
    labelled = run_update(str(parent), None, str(tmp_path / "by_labels"), from_labels=str(tmp_path / "out"),
                          batch_size=8)
    assert labelled["model_id"] == files["model_id"] and sorted(labelled["added"]["images"]) == members
    mixed = members[:2] + sorted(files["added"]["images"])[2:]
    label_normal(tmp_path / "mixed", mixed)
    assert sorted(run_update(str(parent), None, str(tmp_path / "by_mixed"), from_labels=str(tmp_path / "mixed"),
                             batch_size=8)["added"]["images"]) == sorted(mixed)
