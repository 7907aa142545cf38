"""A copy of an MVTec-AD-layout data set whose parts appear at any angle: every image (train and test) and
its ground-truth mask turned about the image centre by its own angle, drawn uniformly from [0, 360).

    python bench/rotated.py ../shared/data/mpdd_metal_plate ROTATED_DIR --seed 0
    anomaly evaluate ROTATED_DIR --out OUT --augment rotations

Images turn as `--augment turns8` turns bank images (anomaly_core.augment.turn_images): bilinear, the
corners from outside the frame filled with the median colour of the image's border (the background of
these sets is plain, so the fill looks like more background; reflecting the image instead would paste
mirrored pieces of the part into the corners). Masks turn with the same
angle, nearest-neighbour, so they stay binary. Images keep their names and format (PNG), so the copy has
the same layout and labels; each image's angle is listed in ROTATED_DIR/angles.json. Used for the
rotated-parts rows of docs/ablation.md: the upright set and its turned copy, fitted and scored the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.augment import turn_images  # noqa: E402
from bench.features import list_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path, help="MVTec-layout folder: train/good, test/<type>, ground_truth/<type>")
    ap.add_argument("out", type=Path, help="folder for the turned copy (must not exist)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the angles")
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; choose a new folder")
    rng = np.random.default_rng(args.seed)
    angles = {}
    for path in list_images(args.dataset / "train") + list_images(args.dataset / "test"):
        rel = path.relative_to(args.dataset)
        degrees = float(rng.uniform(0.0, 360.0))
        angles[str(rel)] = degrees
        image = np.asarray(Image.open(path).convert("RGB"))
        target = (args.out / rel).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(turn_images(image[None], degrees=degrees)[0]).save(target)
        kind = rel.parts[1]
        mask = args.dataset / "ground_truth" / kind / f"{path.stem}_mask.png"
        if rel.parts[0] == "test" and mask.exists():
            m = np.asarray(Image.open(mask).convert("L"))
            mask_out = args.out / "ground_truth" / kind / mask.name
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(turn_images(m[None, ..., None], degrees=degrees, order=0)[0, ..., 0]).save(mask_out)
    (args.out / "angles.json").write_text(json.dumps(angles, indent=1))
    print(f"{len(angles)} images turned into {args.out}")


if __name__ == "__main__":
    main()
