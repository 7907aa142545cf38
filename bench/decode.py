"""Decoding camera-size images for the model: full decode + resize against the JPEG draft path, one run.

    python bench/decode.py [--sizes 2048x2048 4096x3000] [--input-size 392] [--rounds 7] [--photo FILE]

Encodes one photograph (skimage's `coffee`, or --photo) upscaled to each size with sensor-like noise
(Gaussian, sigma 3 grey levels, seeded) as a JPEG (quality 90) and a PNG, then times, on one core, what
every job's read step does per image: the old path, resize_square(decode_image(bytes)), and the new one,
decode_resized(bytes), which lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale. Rates are images
per CPU-second of this process (both paths are single-threaded: images/s on one core), the two paths
interleaved round by round (median of --rounds rounds, each at least 1 CPU-second per path). Prints
images/s of each, their ratio, and the mean / max absolute difference of the [input, input, 3] pixels the
model receives (grey levels of 255).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.images import _open, decode_image, decode_resized, resize_square  # noqa: E402


def camera_image(photo: np.ndarray, width: int, height: int, *, seed: int) -> np.ndarray:
    """[h, w, 3] uint8 photograph -> [height, width, 3] uint8: bicubic upscale plus Gaussian noise of sigma 3,
    so the JPEG carries the fine detail of a sensor rather than an upscale's smooth ramps."""
    up = np.asarray(Image.fromarray(photo).resize((width, height), Image.BICUBIC), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, 3.0, up.shape).astype(np.float32)
    return np.clip(up + noise, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def rate(fn: Callable[[], object], *, min_seconds: float = 1.0) -> float:
    """Calls of fn per CPU-second of this process over at least min_seconds of it (at least 2 calls).
    Decoding and resizing are single-threaded, so this is images/s on one core, and unlike wall time it
    does not depend on how much of a shared core the process was given."""
    n, t0 = 0, time.process_time()
    while n < 2 or time.process_time() - t0 < min_seconds:
        fn()
        n += 1
    return n / (time.process_time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["2048x2048", "4096x3000"], help="WIDTHxHEIGHT, px")
    ap.add_argument("--input-size", type=int, default=ModelConfig().input_size,
                    help="model input side, px (default: the default config's, tiles included)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--photo", help="an image file to upscale instead of skimage's coffee photograph")
    a = ap.parse_args()
    if a.photo:
        photo = decode_image(Path(a.photo).read_bytes())
    else:
        import skimage.data
        photo = skimage.data.coffee()                                              # [400, 600, 3] uint8
    s = a.input_size
    print(f"input {s} px, median of {a.rounds} rounds, images per CPU-second of one process")
    print("| format | image px | file MB | decoded at | old images/s | new images/s | new / old | "
          "mean abs diff | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, size in enumerate(a.sizes):
        width, height = (int(v) for v in size.split("x"))
        image = camera_image(photo, width, height, seed=i)
        for fmt in ("JPEG", "PNG"):
            data = encode(image, fmt)
            old = resize_square(decode_image(data), s)
            new, w, h = decode_resized(data, size=s)
            assert (w, h) == (width, height), (w, h)
            diff = np.abs(old.astype(np.int16) - new)
            rates = {"old": [], "new": []}
            for _ in range(a.rounds):
                rates["old"].append(rate(lambda d=data: resize_square(decode_image(d), s)))
                rates["new"].append(rate(lambda d=data: decode_resized(d, size=s)))
            r_old, r_new = statistics.median(rates["old"]), statistics.median(rates["new"])
            decoded = _open(data, draft_size=s)[0]                            # what libjpeg produced
            print(f"| {fmt} | {width} x {height} | {len(data) / 2**20:.1f} | {decoded.width} x {decoded.height} | "
                  f"{r_old:.1f} | {r_new:.1f} | {r_new / r_old:.2f} | {diff.mean():.2f} | {diff.max()} |",
                  flush=True)


if __name__ == "__main__":
    main()
