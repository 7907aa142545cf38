import io

import numpy as np
import pytest
from PIL import Image

from anomaly_core.images import (
    ImageDecodeError,
    _draft_scale,
    decode_image,
    decode_resized,
    resize_square,
    size_mismatch,
    size_range,
)


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


def photo_like(rng, height, width, channels=3):
    """[height, width, channels] uint8: smooth random shapes plus sensor-like noise, as a camera image
    compresses (pure noise would make a JPEG far larger and slower than a real one)."""
    small = rng.integers(0, 256, (max(height // 64, 2), max(width // 64, 2), channels), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small.squeeze()).resize((width, height), Image.BICUBIC), np.float64)
    noisy = smooth.reshape(height, width, channels) + rng.normal(0, 3, (height, width, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def jpeg(arr, mode=None, **save_kw):
    buf = io.BytesIO()
    im = Image.fromarray(arr.squeeze())
    (im.convert(mode) if mode else im).save(buf, format="JPEG", quality=95, **save_kw)
    return buf.getvalue()


def full_path(data, size):
    """What decoding did before JPEG drafts: full decode, then the same resize."""
    return resize_square(decode_image(data), size)


@pytest.mark.parametrize("width,height,size,scale", [
    (4096, 3000, 392, 4),      # 1/8 would give 375 rows < 392
    (2048, 2048, 224, 8),
    (2048, 2048, 392, 4),
    (512, 512, 224, 2),
    (400, 400, 224, 1),        # halving would go below the input size
    (2590, 1943, 224, 1),      # an odd side: no reduction divides it exactly
    (4024, 3036, 224, 4),      # 3036 / 8 is not whole, / 4 is
])
def test_draft_scale_is_the_largest_exact_reduction_not_below_the_input(width, height, size, scale):
    assert _draft_scale(width, height, size) == scale


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_large_jpeg_decoded_reduced_is_close_to_the_full_decode(rng, mode):
    data = jpeg(photo_like(rng, 1200, 1600), mode)                   # drafted 1/8 for 112 px
    pixels, width, height = decode_resized(data, size=112)
    ref = full_path(data, 112)
    assert pixels.shape == ref.shape == (112, 112, 3) and (width, height) == (1600, 1200)
    assert np.abs(pixels.astype(int) - ref).mean() < 1.0


def test_reduced_decode_follows_exif_orientation(rng):
    exif = Image.Exif()
    exif[0x0112] = 6                                                  # stored sideways: rotate 90 degrees cw
    data = jpeg(photo_like(rng, 1200, 1600), exif=exif)
    pixels, width, height = decode_resized(data, size=112)
    assert (width, height) == (1200, 1600)                           # as viewers show it
    assert np.abs(pixels.astype(int) - full_path(data, 112)).mean() < 1.0


@pytest.mark.parametrize("encode_fn", [jpeg, lambda a: encode(a, "PNG")], ids=["small jpeg", "png"])
def test_images_not_drafted_decode_exactly_as_in_full(rng, encode_fn):
    data = encode_fn(photo_like(rng, 200, 300))                       # too small to halve for 112 px
    pixels, width, height = decode_resized(data, size=112)
    np.testing.assert_array_equal(pixels, full_path(data, 112))
    assert (width, height) == (300, 200)


def test_truncated_large_jpeg_raises_when_decoded_reduced(rng):
    data = jpeg(photo_like(rng, 1200, 1600))
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_resized(data[: len(data) // 2], size=112)


def test_decompression_bomb_is_refused_before_any_reduced_decode(rng, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1600 * 1200 // 4)  # scaled down to test sizes; 4x over it
    with pytest.raises(ImageDecodeError, match="DecompressionBomb"):
        decode_resized(jpeg(photo_like(rng, 1200, 1600)), size=112)


def test_size_range_records_the_sides_and_aspects_of_the_training_images():
    got = size_range(np.array([640, 800, 600]), np.array([480, 600, 600]))
    assert got == {"min_side": 480, "max_side": 800, "min_aspect": 1.0, "max_aspect": round(4 / 3, 4)}


def test_images_far_from_the_training_sizes_are_named_with_the_reason():
    sizes = size_range(np.array([640, 800]), np.array([480, 600]))          # 4:3 parts, sides 480-800 px
    assert size_mismatch(700, 520, sizes) == ""                               # within the range
    assert size_mismatch(400, 300, sizes) == ""                               # 300 > 480 / 2: same scale, roughly
    assert "too small" in size_mismatch(31, 4000, sizes)                      # a strip: under 32 px on a side
    assert "480-800 px" in size_mismatch(200, 150, sizes)                     # over 2x smaller than any
    assert "480-800 px" in size_mismatch(2000, 1500, sizes)                   # over 2x larger than any
    assert "aspect" in size_mismatch(800, 800, sizes)                         # square among 4:3: 1.33x off


def test_without_a_recorded_range_only_tiny_images_are_named():
    assert size_mismatch(4000, 1, None).startswith("image is 4000 x 1 px")
    assert size_mismatch(4000, 100, None) == ""
