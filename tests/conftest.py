from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """[n, d] float32, rows L2-normalised."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray for the whole session (starting it costs ~10 s)."""
    import ray

    from jobs.runtime import ensure_ray
    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def texture_dataset(tmp_path_factory) -> Path:
    """A small MVTec-layout folder of real brick-texture crops with drawn defects, at 112 px."""
    from jobs.demo import make_dataset
    return make_dataset(tmp_path_factory.mktemp("tex") / "brick", n_train=10, n_good=4, n_defect=6,
                        size=112, seed=1)


TEST_CONFIG_KW = {"image_size": 112, "blocks": (6,)}


@pytest.fixture(scope="session")
def fitted_model_dir(ray_local, texture_dataset, tmp_path_factory):
    """(model dir, manifest) fitted through the Ray fit job on the texture dataset."""
    from anomaly_core.config import ModelConfig
    from jobs.fit import run_fit
    path = tmp_path_factory.mktemp("model") / "m"
    manifest = run_fit(str(texture_dataset / "train" / "good"), str(path), config=ModelConfig(**TEST_CONFIG_KW),
                       batch_size=8)
    return path, manifest


@pytest.fixture(scope="session")
def nightly_output(fitted_model_dir, texture_dataset, tmp_path_factory):
    """Two nights of audits of an archive laid out as product=/line= folders, with one corrupt file:
    (output dir, [summary night 1, summary night 2])."""
    import shutil

    from jobs.score import run_score
    archive = tmp_path_factory.mktemp("nightly")
    for i, f in enumerate(sorted((texture_dataset / "test").rglob("*.png"))):
        line = "L1" if i % 2 else "L2"
        dst = archive / "product=brick" / f"line={line}" / f"{f.parent.name}_{f.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    (archive / "product=brick" / "line=L1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path_factory.mktemp("nightly_out") / "scores"
    runs = [run_score(str(archive), str(fitted_model_dir[0]), str(out), batch_size=8, run_date=d)
            for d in ("2026-11-21", "2026-11-22")]
    return out, runs
