"""Cost of resolution: T x T tiles of 224 px against one forward of the whole image at the same size.

    python bench/tiling.py --tiles 2 3 4 6

Both give the same patch grid (14 px patches over input_size px); this measures seconds per image of
FeatureExtractor.tokens (random pixels, batch of 2, median of 3) and the ratio tiles / whole. A ViT's
attention grows with the square of its token count, so one big forward falls behind as images grow,
while tiles grow with the area only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.config import ModelConfig  # noqa: E402
from bench.features import tokens_seconds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, nargs="+", default=[2, 3, 4])
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| tiles | input px | patch grid | tiles s/img | whole s/img | whole / tiles |")
    print("| --- | --- | --- | --- | --- | --- |")
    for t in a.tiles:
        tiled = ModelConfig(image_size=224, tiles=t, blocks=(7,))
        px = rng.integers(0, 256, (2, tiled.input_size, tiled.input_size, 3), dtype=np.uint8)
        s_tiles = tokens_seconds(tiled, px)
        s_whole = tokens_seconds(ModelConfig(image_size=tiled.input_size, tiles=1, blocks=(7,)), px)
        print(f"| {t} | {tiled.input_size} | {tiled.grid_size} | {s_tiles:.3f} | {s_whole:.3f} | "
              f"{s_whole / s_tiles:.2f} |", flush=True)


if __name__ == "__main__":
    main()
