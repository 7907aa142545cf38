"""Which transformer block(s) to take features from: image and pixel AUROC per block on an MVTec-layout
data set, full bank, in-process (no Ray). One forward pass yields every block.

    python bench/blocks.py ../shared/data/mpdd_metal_plate --blocks 3,5,7,9,11 --combos 5+8,6+9
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.config import SMOOTH_TOP_FRACTION, ModelConfig  # noqa: E402
from anomaly_core.index import MemoryBank  # noqa: E402
from anomaly_core.metrics import auroc  # noqa: E402
from anomaly_core.model import score_features  # noqa: E402
from bench.features import extract, list_images  # noqa: E402
from jobs.evaluate import load_mask  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--blocks", default="3,5,7,9,11")
    ap.add_argument("--combos", default="")
    ap.add_argument("--image-size", type=int, default=224)
    a = ap.parse_args()
    single = [int(b) for b in a.blocks.split(",")]
    combos = [tuple(int(b) for b in c.split("+")) for c in a.combos.split(",") if c]
    needed = sorted(set(single) | {b for c in combos for b in c})
    dim = 384
    s = a.image_size
    cfg_all = ModelConfig(image_size=s, tiles=1, blocks=tuple(needed))

    def feats(paths):
        f = extract(paths, cfg_all)                                      # [N, P, nb*D] jointly normalised
        return {b: f[..., j * dim:(j + 1) * dim] for j, b in enumerate(needed)}

    t = time.time()
    train = feats(list_images(a.dataset / "train" / "good"))
    test_paths = list_images(a.dataset / "test")
    test = feats(test_paths)
    labels = np.array([p.parent.name != "good" for p in test_paths])
    masks = np.stack([load_mask(a.dataset, p, size=s) for p in test_paths])
    print(f"features in {time.time() - t:.0f}s; {len(labels)} test images")

    def norm(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    for combo in [(b,) for b in single] + combos:
        tr = norm(np.concatenate([norm(train[b]) for b in combo], -1))
        te = norm(np.concatenate([norm(test[b]) for b in combo], -1))
        cfg = ModelConfig(blocks=combo, image_size=s, tiles=1, top_fraction=SMOOTH_TOP_FRACTION)   # top-1% mean
        bank = MemoryBank.build(tr.reshape(-1, tr.shape[-1]))
        r = score_features(te, bank, config=cfg)
        sc, maps = r.scores, r.maps
        print(f"blocks={'+'.join(map(str, combo)):6s} image_auroc={auroc(labels, sc):.3f} "
              f"pixel_auroc={auroc(masks.ravel(), maps.ravel()):.3f}", flush=True)


if __name__ == "__main__":
    main()
