"""Image decoding and resizing: bytes in, fixed-size uint8 RGB out, or a clear error."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp")


class ImageDecodeError(ValueError):
    """The bytes are not a readable image; the message says why."""


def content_hash(data: bytes) -> str:
    """sha256 of the file's bytes, hex: identifies an image independently of where it is stored."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> [H, W, 3] uint8 RGB.

    Grayscale, palette, alpha, CMYK and 16-bit images are converted; EXIF orientation is applied so the
    array (and the heatmap) matches what image viewers show. Empty, truncated or non-image bytes raise
    ImageDecodeError.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()                                   # decode now: truncated files fail here
            im = ImageOps.exif_transpose(im)
    except Exception as e:                              # PIL raises many types for bad input
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from e
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if im.mode in ("P", "LA", "PA") else im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [size, size, 3] uint8, bilinear with antialiasing.

    The whole frame is kept (no centre crop): a defect at the border of an archive image must still be
    seen, at the cost of squashing non-square images.
    """
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, reducing_gap=None))
