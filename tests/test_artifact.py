"""The model folder (anomaly_core/artifact.py): round trip, checksums, and a folder from an untrusted
bucket: names that could leave the cache, an edited manifest, a pinned id, a tampered bank."""

import contextlib
import hashlib
import json
import re
from pathlib import Path

import faiss
import numpy as np
import pytest

from anomaly_core import storage
from anomaly_core.artifact import MANIFEST, ModelFileError, content_id, load_artifact, save_model
from anomaly_core.config import ModelConfig
from anomaly_core.index import MemoryBank
from anomaly_core.storage import StorageOptions
from anomaly_core.threshold import calibrate
from tests.helpers import make_bucket, unit_rows


def _save(path, rng, **kw):
    return save_model(path, config=ModelConfig(blocks=(5, 8)), bank=MemoryBank.build(unit_rows(rng, 30, 8)),
                      calibration=calibrate(np.array([0.1, 0.2, 0.15]), false_alarm_rate=0.05).to_dict(),
                      weights={"source": "test", "state_sha256": "x"}, stats={"n_images": 3}, **kw)


def test_round_trip(tmp_path, rng):
    manifest = _save(tmp_path / "m", rng)
    loaded, bank, arrays = load_artifact(tmp_path / "m")
    assert ModelConfig.from_dict(loaded["config"]) == ModelConfig(blocks=(5, 8))
    assert bank.size == 30 and loaded["model_id"] == manifest["model_id"] and arrays is None
    assert not list(tmp_path.glob(".m.tmp-*"))                       # no temporary left behind


def test_calibration_arrays_round_trip_checksummed_and_in_the_id(tmp_path, rng):
    arrays = {"grids": rng.random((3, 16), dtype=np.float32), "positions": np.arange(12, dtype=np.int32).reshape(3, 4)}
    plain = _save(tmp_path / "a", np.random.default_rng(1))
    manifest = _save(tmp_path / "m", np.random.default_rng(1), calibration_patches=arrays)
    again = _save(tmp_path / "n", np.random.default_rng(1), calibration_patches=arrays)
    assert manifest["model_id"] == again["model_id"] != plain["model_id"]        # same arrays, same id
    _, _, loaded = load_artifact(tmp_path / "m")
    assert loaded.keys() == arrays.keys() and all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    (tmp_path / "m" / manifest["calibration_patches"]["grids"]).write_bytes(b"tampered")
    with pytest.raises(ModelFileError, match="modified or corrupted"):
        load_artifact(tmp_path / "m")


def test_an_updated_model_records_its_parent_and_what_was_added_outside_its_id(tmp_path, rng):
    plain = _save(tmp_path / "a", np.random.default_rng(1))
    child = _save(tmp_path / "b", np.random.default_rng(1), lineage={"parent": "0123456789abcdef",
                                                                     "added": {"images": ["x.png"]}})
    assert (child["parent"], child["added"]) == ("0123456789abcdef", {"images": ["x.png"]})
    assert child["model_id"] == plain["model_id"]           # the same bank and threshold score alike
    assert load_artifact(tmp_path / "b")[0]["parent"] == "0123456789abcdef"


def test_a_lineage_without_a_parent_model_id_is_refused(tmp_path, rng):
    with pytest.raises(ModelFileError, match="not 16 lower-case hex digits"):
        _save(tmp_path / "m", rng, lineage={"parent": "../etc", "added": {}})
    with pytest.raises(ValueError, match="'parent' and 'added'"):
        _save(tmp_path / "m", rng, lineage={"parent": "0123456789abcdef"})


def test_manifest_is_plain_json_with_checksums(tmp_path, rng):
    _save(tmp_path / "m", rng)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"bank-00000.faiss"} == set(manifest["bank"]["shards"])
    assert len(manifest["files"]["bank-00000.faiss"]["sha256"]) == 64
    assert manifest["config"]["blocks"] == [5, 8] and "torch" in manifest["versions"]


def test_modified_bank_is_refused(tmp_path, rng):
    _save(tmp_path / "m", rng)
    with open(tmp_path / "m" / "bank-00000.faiss", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFileError, match="bank-00000.faiss.*modified or corrupted"):
        load_artifact(tmp_path / "m")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelFileError, match="anomaly fit"):
        load_artifact(tmp_path)


def test_existing_model_is_not_overwritten_silently(tmp_path, rng):
    _save(tmp_path / "m", rng)
    with pytest.raises(FileExistsError, match="overwrite"):
        _save(tmp_path / "m", rng)
    _save(tmp_path / "m", rng, overwrite=True)


def _edit(model: Path, **changes) -> dict:
    """Rewrite the model's manifest with `changes`, its id recomputed as anyone able to write the folder
    can do; returns the new manifest."""
    manifest = json.loads((model / MANIFEST).read_text())
    manifest.update(changes)
    manifest["model_id"] = content_id(manifest)
    (model / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_the_model_id_is_recomputed_from_the_content(tmp_path, rng):
    manifest = _save(tmp_path / "m", rng)
    assert content_id(manifest) == manifest["model_id"]
    edited = dict(manifest, calibration={**manifest["calibration"], "threshold": 99.0})
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(edited))           # a higher threshold, same id
    with pytest.raises(ModelFileError, match=f"says model id {manifest['model_id']} but its content hashes"):
        load_artifact(tmp_path / "m")


def test_a_pinned_model_is_loaded_and_any_other_refused_before_its_files_are_read(tmp_path, rng):
    pinned = _save(tmp_path / "m", rng)["model_id"]
    assert load_artifact(tmp_path / "m", model_id=pinned)[0]["model_id"] == pinned
    _save(tmp_path / "m", np.random.default_rng(7), overwrite=True)       # refitted in place: another bank
    (tmp_path / "m" / "bank-00000.faiss").unlink()                        # reading it would fail otherwise
    with pytest.raises(ModelFileError, match=f"not the pinned model {pinned}"):
        load_artifact(tmp_path / "m", model_id=pinned)


def test_a_tampered_bank_is_refused_before_faiss_reads_it(tmp_path, rng):
    _save(tmp_path / "m", rng)
    (tmp_path / "m" / "bank-00000.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(RuntimeError):                                     # what FAISS would have said
        faiss.read_index(str(tmp_path / "m" / "bank-00000.faiss"))
    with pytest.raises(ModelFileError, match="bank-00000.faiss has sha256 .* modified or corrupted"):
        load_artifact(tmp_path / "m")


@pytest.mark.parametrize("pinned", ["../../somewhere", "3F0C9A1B2C3D4E5F", "abc"])
def test_a_pinned_id_not_in_the_fit_format_is_refused(tmp_path, rng, pinned):
    _save(tmp_path / "m", rng)
    with pytest.raises(ModelFileError, match=re.escape(repr(pinned))):
        load_artifact(tmp_path / "m", model_id=pinned)


HOSTILE_NAMES = ["../../escape.faiss", "/tmp/absolute.faiss", "sub/dir.faiss", "..", ".hidden", "a\\b.faiss",
                 MANIFEST]


def _hostile(model: Path, case: str) -> tuple[dict, str]:
    """The model's manifest made hostile: (manifest, the offending value). `case`: "model_id" or a file name."""
    manifest = json.loads((model / MANIFEST).read_text())
    if case == "model_id":
        manifest["model_id"] = "../../somewhere"
        (model / MANIFEST).write_text(json.dumps(manifest))
        return manifest, "../../somewhere"
    files = {case: manifest["files"]["bank-00000.faiss"]}
    return _edit(model, files=files, bank={**manifest["bank"], "shards": [case]}), case


@pytest.mark.parametrize("case", ["model_id", *HOSTILE_NAMES])
def test_names_in_a_local_manifest_that_could_leave_the_folder_are_refused(tmp_path, rng, case):
    _save(tmp_path / "m", rng)
    _, value = _hostile(tmp_path / "m", case)
    with pytest.raises(ModelFileError, match=re.escape(repr(value))):
        load_artifact(tmp_path / "m")


def test_a_shard_without_a_checksum_is_refused(tmp_path, rng):
    manifest = _save(tmp_path / "m", rng)
    _edit(tmp_path / "m", bank={**manifest["bank"], "shards": ["bank-00000.faiss", "bank-00001.faiss"]})
    with pytest.raises(ModelFileError, match="shard 'bank-00001.faiss' has no checksum"):
        load_artifact(tmp_path / "m")


# ---- models in a shared bucket: the real S3 server -------------------------------------------------------

@pytest.fixture
def bucket(s3_server, tmp_path, monkeypatch):
    """(options, cache folder) for a bucket `models-<test>` on the test S3 server; the cache is empty and
    lies two levels below tmp_path, so that an escape would land in tmp_path."""
    name = "hostile-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    make_bucket(s3_server.url, name)
    cache = tmp_path / "a" / "cache"
    monkeypatch.setenv("ANOMALY_CACHE", str(cache))
    return name, StorageOptions(endpoint_url=s3_server.url, max_attempts=2), cache


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.integration
@pytest.mark.parametrize("case", ["model_id", *HOSTILE_NAMES])
def test_a_hostile_manifest_on_s3_writes_nothing_outside_the_cache(bucket, tmp_path, rng, case):
    name, opts, cache = bucket
    _save(tmp_path / "src", rng)
    manifest, value = _hostile(tmp_path / "src", case)
    bank = (tmp_path / "src" / "bank-00000.faiss").read_bytes()
    uri = f"s3://{name}/shared/model"
    for f in manifest["files"]:                    # the bank also under the hostile key, where S3 allows it
        with contextlib.suppress(OSError, ValueError):
            storage.write_bytes(storage.join(uri, f), bank, opts)
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest).encode(), opts)
    before = _files(tmp_path)
    with pytest.raises(ModelFileError, match=re.escape(repr(value))):
        load_artifact(uri, opts)
    assert _files(tmp_path) == before and not cache.exists()


@pytest.mark.integration
def test_an_s3_model_is_cached_whole_and_a_pinned_mismatch_fetches_nothing(bucket, tmp_path, rng):
    name, opts, cache = bucket
    manifest = _save(f"s3://{name}/m", rng, options=opts)
    other = _save(f"s3://{name}/other", np.random.default_rng(7), options=opts)
    with pytest.raises(ModelFileError, match=f"holds model {other['model_id']}, not the pinned"):
        load_artifact(f"s3://{name}/other", opts, model_id=manifest["model_id"])
    assert not cache.exists()                                     # refused before a byte of the bank
    loaded, bank, _ = load_artifact(f"s3://{name}/m", opts, model_id=manifest["model_id"])
    assert bank.size == 30 and _files(cache) == {f"models/{manifest['model_id']}/{f}"
                                                  for f in ("bank-00000.faiss", MANIFEST)}


@pytest.mark.integration
def test_a_tampered_bank_on_s3_never_reaches_the_cache(bucket, rng):
    name, opts, cache = bucket
    _save(f"s3://{name}/m", rng, options=opts)
    storage.write_bytes(f"s3://{name}/m/bank-00000.faiss", b"replaced", opts)
    with pytest.raises(ModelFileError, match="bank-00000.faiss has sha256"):
        load_artifact(f"s3://{name}/m", opts)
    assert not list(cache.rglob("*.faiss"))
