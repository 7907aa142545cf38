"""Incremental update against a full refit on the union (issue 19 item 3).

    python bench/update.py ../shared/data/mpdd_metal_plate --image-size 224 --tiles 1 --seeds 0,1,2 --cache CACHE_DIR

train/good is cut in two by a seeded permutation: the parent model is fitted on the first half; then for
each share of the second half (--shares) the parent is updated with it (Model.update_features) and,
beside it, a model is refitted on the first half plus that share (Model.fit_features). Both are scored on
test/ (image AUROC, threshold, share of the good test images flagged). Each row is one run on one
machine, so its ratios compare like with like. --seeds repeats it over other cuts; the summary gives the
spread of update minus refit AUROC and, for scale, of the refits' own AUROC.

Time. Both paths start from features: the backbone's seconds per image are measured once (FeatureExtractor.describe
over the images, no cache) and charged to each path for the images it must describe, the new images for the
update, all of them for the refit; the selection and calibration seconds are measured per row. The update's
total is therefore proportional to the new images, the refit's to the union.
Bank. The vectors each path adds to the parent's bank, against what adding the same share at the fit's
density (coreset_ratio x the new bank patches) would add.

--cache DIR keeps the features of each set (float16) so that reruns skip the backbone; the seconds per
image are then read from the cache's record of the run that wrote it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core import metrics  # noqa: E402
from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.features import FeatureExtractor  # noqa: E402
from anomaly_core.model import Model  # noqa: E402
from bench.features import list_images, read_pixels  # noqa: E402


def describe(paths: list[Path], extractor: FeatureExtractor, *, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, G*G, D] float32, foreground [N, G*G] bool) of the image files, as the jobs describe them."""
    feats, fgs = [], []
    for i in range(0, len(paths), batch):
        f, fg = extractor.describe(read_pixels(paths[i:i + batch], extractor.config.input_size))
        feats.append(f)
        fgs.append(fg)
    return np.concatenate(feats), np.concatenate(fgs)


def features(root: Path, split: str, extractor: FeatureExtractor, cache: Path | None
             ) -> tuple[list[Path], np.ndarray, np.ndarray, float]:
    """Paths, features, foreground and backbone seconds per image of train/good or test/."""
    cfg = extractor.config
    paths = list_images(root / "train" / "good") if split == "train" else list_images(root / "test")
    f = cache / f"update_{root.name}_{cfg.image_size}_t{cfg.tiles}_{split}.npz" if cache else None
    if f is not None and f.exists():
        z = np.load(f)
        return paths, z["features"].astype(np.float32), z["foreground"], float(z["seconds_per_image"])
    t0 = time.perf_counter()
    feats, fg = describe(paths, extractor)
    per_image = (time.perf_counter() - t0) / len(paths)
    print(f"  {root.name} {split}: features of {len(paths)} images, {per_image:.3f} s per image", flush=True)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        np.savez(f, features=feats.astype(np.float16), foreground=fg, seconds_per_image=per_image)
    feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    return paths, feats, fg, per_image


def quality(model: Model, test: np.ndarray, fg: np.ndarray, labels: np.ndarray) -> dict:
    scores = model.score_features(test, fg, maps=False).scores
    return {"auroc": round(metrics.auroc(labels, scores), 4), "threshold": round(model.calibration.threshold, 4),
            "good_flagged": round(float(model.is_anomalous(scores)[~labels].mean()), 3),
            "defects_flagged": round(float(model.is_anomalous(scores)[labels].mean()), 3)}


def run(root: Path, *, cfg: ModelConfig, shares: list[float], seed: int, cache: Path | None) -> dict:
    extractor = FeatureExtractor(config=cfg, device="cpu")
    train_paths, train, train_fg, per_image = features(root, "train", extractor, cache)
    test_paths, test, test_fg, _ = features(root, "test", extractor, cache)
    labels = np.array([p.parent.name != "good" for p in test_paths])
    names = np.array([str(p.relative_to(root)) for p in train_paths])
    order = np.random.default_rng(seed).permutation(len(names))
    first, second = order[:len(order) // 2], order[len(order) // 2:]

    def fit(rows: np.ndarray) -> tuple[Model, float]:
        t0 = time.perf_counter()
        m = Model.fit_features(train[rows], config=cfg, foreground=train_fg[rows], paths=names[rows],
                               weights=extractor.backbone.identity)
        return m, time.perf_counter() - t0

    parent, parent_s = fit(first)
    parent.save(Path(tempfile.mkdtemp(prefix="bench-update-")) / "parent")        # an id to record as parent
    out = {"data": root.name, "image_size": cfg.image_size, "tiles": cfg.tiles, "grid": cfg.grid_size,
           "train_images": len(names), "test_images": len(labels), "seed": seed,
           "backbone_seconds_per_image": round(per_image, 3),
           "parent": {"images": len(first), "bank": parent.bank.size,
                      "cover_radius": round(parent.stats.cover_radius, 4), "selection_seconds": round(parent_s, 2),
                      **quality(parent, test, test_fg, labels)},
           "rows": []}
    print(json.dumps(out["parent"]), flush=True)
    for share in shares:
        new = second[:max(1, round(share * len(second)))]
        t0 = time.perf_counter()
        updated = parent.update_features(train[new], foreground=train_fg[new], paths=names[new])
        update_s = time.perf_counter() - t0
        refit, refit_s = fit(np.concatenate([first, new]))
        added = updated.lineage["added"]
        row = {"new_images": len(new),
               "update": {"bank": updated.bank.size, "added": added["vectors"], "candidates": added["candidates"],
                          "new_patches": added["patches"], "cover_radius": round(updated.stats.cover_radius, 4),
                          "selection_seconds": round(update_s, 2),
                          "seconds": round(update_s + per_image * len(new), 1),
                          "calibration": added["calibration"], **quality(updated, test, test_fg, labels)},
               "refit": {"bank": refit.bank.size, "cover_radius": round(refit.stats.cover_radius, 4),
                         "selection_seconds": round(refit_s, 2),
                         "seconds": round(refit_s + per_image * (len(first) + len(new)), 1),
                         **quality(refit, test, test_fg, labels)},
               "added_at_fit_density": int(np.ceil(cfg.coreset_ratio * added["patches"]))}
        row["auroc_update_minus_refit"] = round(row["update"]["auroc"] - row["refit"]["auroc"], 4)
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tiles", type=int, default=1)
    ap.add_argument("--shares", default="0.25,0.5,1", help="Shares of the second half added, comma-separated.")
    ap.add_argument("--seeds", default="0", help="Seeds of the cut into halves, comma-separated: one run each.")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="Write the results here too.")
    a = ap.parse_args()
    cfg = ModelConfig(image_size=a.image_size, tiles=a.tiles)
    runs = [run(a.dataset, cfg=cfg, shares=[float(s) for s in a.shares.split(",")], seed=int(seed), cache=a.cache)
            for seed in a.seeds.split(",")]
    diffs = [r["auroc_update_minus_refit"] for one in runs for r in one["rows"]]
    summary = {"date": dt.date.today().isoformat(), "runs": len(runs), "rows": len(diffs),
               "auroc_update_minus_refit": {"mean": round(float(np.mean(diffs)), 4),
                                            "min": min(diffs), "max": max(diffs)},
               "refit_auroc": {"min": min(r["refit"]["auroc"] for one in runs for r in one["rows"]),
                               "max": max(r["refit"]["auroc"] for one in runs for r in one["rows"])}}
    print(json.dumps(summary), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
