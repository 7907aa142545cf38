import io

import numpy as np
import pytest
from PIL import Image

from anomaly_core.images import ImageDecodeError, decode_image, resize_square


def encode(arr, fmt="PNG", mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def test_rgb_png_round_trip(rng):
    a = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(a)), a)


@pytest.mark.parametrize("arr", [np.full((8, 9), 77, np.uint8), np.full((8, 9, 4), 77, np.uint8)])
def test_gray_and_rgba_become_rgb(arr):
    out = decode_image(encode(arr))
    assert out.shape == (8, 9, 3) and out.dtype == np.uint8 and (out == 77).all()


def test_16bit_gray_is_scaled_to_8bit():
    a = np.full((6, 6), 65535, np.uint16)
    assert (decode_image(encode(a)) == 255).all()


def test_jpeg_decodes():
    assert decode_image(encode(np.zeros((16, 16, 3), np.uint8), "JPEG")).shape == (16, 16, 3)


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"not an image at all", "cannot decode")])
def test_bad_bytes_raise_a_clear_error(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_png_raises(rng):
    data = encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_resize_square_keeps_whole_frame():
    a = np.zeros((10, 40, 3), np.uint8)
    a[:, -5:] = 255                                                   # bright right border
    out = resize_square(a, 28)
    assert out.shape == (28, 28, 3) and out[:, -1].mean() > 200
