import json

import numpy as np
import pytest

from anomaly_core.artifact import ModelFileError, load_artifact, save_model
from anomaly_core.config import ModelConfig
from anomaly_core.index import MemoryBank
from anomaly_core.threshold import calibrate
from tests.helpers import unit_rows


def _save(path, rng, **kw):
    return save_model(path, config=ModelConfig(blocks=(5, 8)), bank=MemoryBank.build(unit_rows(rng, 30, 8)),
                      calibration=calibrate(np.array([0.1, 0.2, 0.15]), false_alarm_rate=0.05).to_dict(),
                      weights={"source": "test", "state_sha256": "x"}, stats={"n_images": 3}, **kw)


def test_round_trip(tmp_path, rng):
    manifest = _save(tmp_path / "m", rng)
    loaded, bank = load_artifact(tmp_path / "m")
    assert ModelConfig.from_dict(loaded["config"]) == ModelConfig(blocks=(5, 8))
    assert bank.size == 30 and loaded["model_id"] == manifest["model_id"]
    assert not list(tmp_path.glob(".m.tmp-*"))                       # no temporary left behind


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
