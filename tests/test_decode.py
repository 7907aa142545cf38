"""Bytes -> pixels per batch: bad images become rows with an error."""

import numpy as np
from PIL import Image

from anomaly_core.decode import decode_batch
from tests.helpers import png_bytes
from tests.test_images import jpeg, photo_like


def test_decode_batch_keeps_bad_rows_with_an_error(rng):
    good = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    batch = {"path": np.array(["a.png", "b.png", "c.png"], dtype=object),
             "bytes": np.array([png_bytes(good), b"", b"garbage"], dtype=object)}
    out = decode_batch(batch, input_size=28)
    assert out["pixels"].shape == (3, 28, 28, 3) and "bytes" not in out
    assert list(out["error"] == "") == [True, False, False]
    assert (out["width"][0], out["height"][0]) == (40, 30)
    assert "empty" in out["error"][1] and len(out["content_sha256"][2]) == 64


def test_a_row_that_arrives_with_an_error_keeps_it(rng):
    batch = {"path": np.array(["s3://b/gone.png"], dtype=object), "bytes": np.array([b""], dtype=object),
             "error": np.array(["s3://b/gone.png not found"], dtype=object)}
    out = decode_batch(batch, input_size=14)
    assert out["error"][0] == "s3://b/gone.png not found" and out["width"][0] == 0


def test_a_large_jpeg_keeps_its_original_size_in_the_row(rng):
    batch = {"path": np.array(["big.jpg"], dtype=object),
             "bytes": np.array([jpeg(photo_like(rng, 1200, 1600))], dtype=object)}
    out = decode_batch(batch, input_size=112)                         # decoded at 1/8: 200 x 150
    assert (out["width"][0], out["height"][0]) == (1600, 1200) and out["pixels"].shape == (1, 112, 112, 3)


def test_an_image_over_the_decompression_bomb_limit_is_a_row_with_an_error(rng, monkeypatch):
    # the limit scaled down to test sizes: 1.33x over it, where PIL only warns (2x over it raises)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1600 * 1200 * 3 // 4)
    batch = {"path": np.array(["bomb.jpg", "bomb.png"], dtype=object),
             "bytes": np.array([jpeg(photo_like(rng, 1200, 1600)), png_bytes(photo_like(rng, 1200, 1600))],
                               dtype=object)}
    out = decode_batch(batch, input_size=112)
    assert all("DecompressionBomb" in e for e in out["error"]) and (out["width"] == 0).all()
