"""Fixtures and the environment the tests run in. Helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TEST_CONFIG_KW, TEST_SECRET

# Set before Ray starts, so its workers inherit them: credentials the test S3 server accepts, no EC2
# metadata lookups, a model cache of our own.
os.environ.update(AWS_ACCESS_KEY_ID="test-key-id", AWS_SECRET_ACCESS_KEY=TEST_SECRET,
                  AWS_EC2_METADATA_DISABLED="true")
os.environ.setdefault("ANOMALY_CACHE", tempfile.mkdtemp(prefix="anomaly-cache-"))
for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(var, None)

# Fixtures that start Ray or an S3 server; a test that uses one (directly or through another fixture)
# must be marked `integration`, so that `make test-unit` never starts them. Tests that start a server,
# a browser or a Ray head by themselves are marked by hand.
STARTS_A_SERVICE = {"ray_local": "Ray", "s3_server": "an S3 server", "ray_head": "a Ray head"}


def pytest_collection_modifyitems(config, items):
    unmarked = [f"{item.nodeid} (starts {', '.join(STARTS_A_SERVICE[f] for f in sorted(used))})"
                for item in items
                if (used := STARTS_A_SERVICE.keys() & set(item.fixturenames))
                and item.get_closest_marker("integration") is None]
    if unmarked:
        raise pytest.UsageError(
            "tests that start a service must be marked integration, so the unit selection stays fast; add "
            "`pytestmark = pytest.mark.integration` to the module or `@pytest.mark.integration` to the test:\n  "
            + "\n  ".join(unmarked))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


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


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the session, with a relay in front that tests may cut."""
    from tests.s3server import MotoServer, Relay
    server = MotoServer()
    relay = Relay(server.port)
    relay.direct_url = server.url                    # bypasses the relay, for checks during an outage
    yield relay
    relay.cut()
    server.stop()

