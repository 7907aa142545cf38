"""Quality on real data (../shared/data), skipped where the shared folder is absent."""

import pytest

from anomaly_core.config import ModelConfig
from jobs.evaluate import run_evaluate
from tests.helpers import SHARED_DATA

# evaluates through Ray
pytestmark = pytest.mark.integration

HAZELNUT = SHARED_DATA / "hazelnut_toy"


@pytest.mark.realdata
@pytest.mark.skipif(not HAZELNUT.is_dir(), reason=f"{HAZELNUT} not present")
def test_hazelnut_toy_is_detected_well_above_chance(ray_local, tmp_path):
    m = run_evaluate(str(HAZELNUT), str(tmp_path), config=ModelConfig())
    assert m["image_auroc"] >= 0.85, m
    assert m["pixel_auroc"] >= 0.85, m
