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
