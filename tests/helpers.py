"""What tests share besides fixtures: data makers, S3 helpers and constants. Tests import these from here;
tests/conftest.py holds only fixtures and the environment set-up."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The secret key the test S3 server accepts; tests look for it in every file the jobs write.
TEST_SECRET = "test-secret-7f3a9c-never-written-anywhere"

# A model small enough to fit through Ray in seconds on the texture dataset.
TEST_CONFIG_KW = {"image_size": 112, "tiles": 1, "blocks": (6,)}


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """[n, d] float32, rows L2-normalised."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def textured_part(angle: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] uint8: a bar with a knob at one end (tests/test_align.py's part, scaled from 96 px),
    turned by `angle` (radians, ccw) about the centre, filled with fine noise on a dark noisy background
    (the backbone needs some texture to describe): a part that can lie at any angle."""
    rows, cols = np.mgrid[:size, :size].astype(float) * 96 / size
    dx, dy = cols - 48, -(rows - 48)
    u = dx * np.cos(angle) + dy * np.sin(angle)                   # along the bar
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    shape = ((np.abs(u) < 26) & (np.abs(v) < 6)) | ((u - 26) ** 2 + v ** 2 < 11 ** 2)
    img = np.where(shape, 190, 45) + rng.normal(0, 6, (size, size))
    return np.repeat(img.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)


def as_stored(rows: np.ndarray, kind: str) -> np.ndarray:
    """[n, d] float32 rows as a bank of index `kind` stores them: an hnsw bank keeps float16 vectors."""
    return rows.astype(np.float16).astype(np.float32) if kind == "hnsw" else rows


# Largest change float16 storage makes to a cosine distance between unit rows:
# |<q, v - fp16(v)>| <= |v - fp16(v)| <= 2^-11 (Cauchy-Schwarz; float16 keeps 11 significant bits).
FLOAT16_ROUNDING = 2.0 ** -11


def stored_rounding(kind: str) -> float:
    """How far a distance over a `kind` bank's stored vectors may lie from the float32 one (float32 noise
    for kinds that keep float32)."""
    return FLOAT16_ROUNDING if kind == "hnsw" else 1e-5


def png_bytes(arr: np.ndarray) -> bytes:
    """[H, W(, 3)] uint8 image -> its PNG file's bytes."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_bucket(endpoint_url: str, name: str) -> None:
    import pyarrow.fs as pafs
    pafs.S3FileSystem(endpoint_override=endpoint_url.split("://")[1], scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir(name)


def upload(local: Path, uri: str, options) -> list[str]:
    """Copy every file under `local` to `uri`; returns the object URIs."""
    from anomaly_core import storage
    out = []
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        out.append(storage.join(uri, f.relative_to(local).as_posix()))
        storage.write_bytes(out[-1], f.read_bytes(), options)
    return out


def wait_for_dashboard(url: str, head: subprocess.Popen, *, timeout_s: float = 120) -> None:
    """Return once a `ray start --head` process's dashboard at `url` answers (a 401 without the token counts);
    raise RuntimeError if the process exits first or `timeout_s` passes. The caller owns the process."""
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:                   # 401 without the token: the dashboard is up
            return
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not start (exit {head.poll()})") from None
            time.sleep(0.5)
