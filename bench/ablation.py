"""Ablation of the detection options on MVTec-AD-layout data sets: four metrics and images/s per option.

    python bench/ablation.py ../shared/data/mpdd_metal_plate ../shared/data/magnetic_tile ../shared/data/hazelnut_toy

Each variant changes one or two options of the plain method (block 7, 224 px, no aggregation). The
backbone runs once per input geometry (224 px with blocks 5, 7 and 9 together; 392 px as 2x2 tiles;
392 px whole: the same 28 x 28 patch grid), through the library's own FeatureExtractor.tokens; every
variant then builds descriptors with `describe_tokens`, fits with `Model.fit_features` (composable coreset,
hold-out calibration) and scores with `score_features`, exactly as the jobs do. The few-shot rows fit on 4 good
images (the first 4 of the bank split) and calibrate on the usual held-out ones. Metrics follow
anomaly_core.metrics on float maps at the variant's input_size (`anomaly evaluate` reads back 8-bit
heatmaps, which moves pixel metrics by < 0.001).
Variants that differ only in smoothing share one fit and one search.
images/s = test images / (backbone time at the variant's geometry and deepest block, measured on its own,
+ descriptor, search and map time). `--only NAME ...` runs a subset; `--json FILE` writes the rows
unrounded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core import metrics  # noqa: E402
from anomaly_core.augment import augment_images  # noqa: E402
from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.features import FeatureExtractor, describe_tokens  # noqa: E402
from anomaly_core.fit import SplitPlan  # noqa: E402
from anomaly_core.model import Model, score_features  # noqa: E402
from anomaly_core.scoring import smooth_map  # noqa: E402
from bench.features import list_images, read_pixels, tokens_seconds  # noqa: E402
from jobs.evaluate import load_mask  # noqa: E402

FEW_SHOT = 4
# The plain method of the pipeline issue; every variant starts from it, whatever ModelConfig's defaults are.
PLAIN = {"image_size": 224, "tiles": 1, "blocks": (7,), "smoothing_sigma": 4.0}
# name -> (options that differ from the plain method, bank images: None = the whole bank split)
VARIANTS: dict[str, tuple[dict, int | None]] = {
    "plain (block 7, 224 px)": ({}, None),
    "smoothing 7 px at 224 px": ({"smoothing_sigma": 7.0}, None),
    "neighbourhood 3": ({"neighbourhood": 3}, None),
    "blocks 5+7": ({"blocks": (5, 7)}, None),
    "blocks 7+9": ({"blocks": (7, 9)}, None),
    "position 1.0": ({"position_weight": 1.0}, None),
    "foreground mask": ({"foreground_mask": True}, None),
    "whole image 392 px": ({"image_size": 392}, None),
    "tiles 2 (392 px)": ({"tiles": 2}, None),
    "tiles 2, blocks 5+7": ({"tiles": 2, "blocks": (5, 7)}, None),
    # smoothing_sigma is scaled with the input size (ModelConfig.map_sigma); this row keeps 4 px at 392 px
    "tiles 2, blocks 5+7, smoothing 4 px": ({"tiles": 2, "blocks": (5, 7), "smoothing_sigma": 4 * 224 / 392},
                                            None),
    "tiles 2, foreground mask": ({"tiles": 2, "foreground_mask": True}, None),
    f"{FEW_SHOT}-shot": ({}, FEW_SHOT),
    f"{FEW_SHOT}-shot, dihedral augment": ({"augment": "dihedral"}, FEW_SHOT),
}


def geometry(cfg: ModelConfig) -> tuple[int, int, int]:
    return cfg.image_size, cfg.tiles, cfg.tile_overlap


def tokens_of(raw: np.ndarray, extracted: tuple[int, ...], blocks: tuple[int, ...]) -> np.ndarray:
    """Slice `blocks` out of tokens extracted with blocks `extracted` and renormalise: equal to the tokens
    of a backbone with blocks=blocks (each block unit-normalised, then the concatenation)."""
    d = raw.shape[-1] // len(extracted)
    f = np.concatenate([raw[..., extracted.index(b) * d:(extracted.index(b) + 1) * d] for b in blocks], axis=-1)
    return (f / np.linalg.norm(f, axis=-1, keepdims=True)).astype(np.float32)


def all_tokens(ex: FeatureExtractor, px: np.ndarray, *, batch: int = 16) -> np.ndarray:
    return np.concatenate([ex.tokens(px[i:i + batch]) for i in range(0, len(px), batch)])


def fit_and_search(cfg: ModelConfig, n_few: int | None, t: dict, held: np.ndarray) -> dict:
    """Fit the variant's bank and search its test patches: image scores and unsmoothed maps [M, S, S]."""
    sel = lambda raw: tokens_of(raw, t["blocks"], cfg.blocks)  # noqa: E731
    start = time.perf_counter()
    f_train, fg_train = describe_tokens(sel(t["train"]), config=cfg)
    if n_few:                                       # the few-shot bank (augmented) + the held-out images
        f_few, fg_few = describe_tokens(sel(t["few"][cfg.augment]), config=cfg)
        f_train = np.concatenate([f_few, f_train[held]])
        fg_train = np.concatenate([fg_few, fg_train[held]])
        is_held = np.r_[np.zeros(len(f_few), dtype=bool), np.ones(held.sum(), dtype=bool)]
    else:
        is_held = held
    plan = SplitPlan(fold=np.where(is_held, 0, -1).astype(np.int16), n_folds=1, crossfit=False)
    model = Model.fit_features(f_train, config=cfg, plan=plan, foreground=fg_train)
    t_fit = time.perf_counter() - start
    start = time.perf_counter()
    f_test, fg_test = describe_tokens(sel(t["test"]), config=cfg)
    r = score_features(f_test, model.bank, config=dataclasses.replace(model.config, smoothing_sigma=0.0),
                       foreground=fg_test)
    return {"scores": r.scores, "maps": r.maps, "fit_s": t_fit, "search_s": time.perf_counter() - start,
            "bank": model.bank.size}


def run(root: Path, variants: dict[str, tuple[dict, int | None]]) -> list[dict]:
    train = list_images(root / "train" / "good")
    test = list_images(root / "test")
    labels = np.array([p.parent.name != "good" for p in test])
    # one fixed 20% hold-out for every variant (the metrics here do not use the threshold it calibrates)
    held = np.zeros(len(train), dtype=bool)
    held[np.random.default_rng(0).permutation(len(train))[:max(2, round(0.2 * len(train)))]] = True
    few = np.flatnonzero(~held)[:FEW_SHOT]
    configs = {name: (ModelConfig(**(PLAIN | opts)), n) for name, (opts, n) in variants.items()}
    # one backbone pass per geometry, with every block its variants use
    geoms: dict[tuple, tuple[int, ...]] = {}
    for cfg, _ in configs.values():
        geoms[geometry(cfg)] = tuple(sorted(set(geoms.get(geometry(cfg), ())) | set(cfg.blocks)))
    tok, masks, speed = {}, {}, {}
    for geom, blocks in geoms.items():
        cfg = ModelConfig(image_size=geom[0], tiles=geom[1], tile_overlap=geom[2], blocks=blocks)
        ex = FeatureExtractor(config=cfg, device="cpu")
        px_train = read_pixels(train, cfg.input_size)
        px_test = read_pixels(test, cfg.input_size)
        tok[geom] = {"train": all_tokens(ex, px_train), "test": all_tokens(ex, px_test), "blocks": blocks,
                     "few": {a: all_tokens(ex, augment_images(px_train[few], name=a))
                             for a in {c.augment for c, n in configs.values() if n and geometry(c) == geom}}}
        masks[cfg.input_size] = np.stack([load_mask(root, p, size=cfg.input_size) for p in test])  # [M, S, S]
        for c, _ in configs.values():
            if geometry(c) == geom and (geom, max(c.blocks)) not in speed:
                speed[geom, max(c.blocks)] = tokens_seconds(dataclasses.replace(cfg, blocks=(max(c.blocks),)),
                                                            px_test[:8])
    rows, shared_key, shared = [], None, None
    for name, (cfg, n_few) in configs.items():
        # variants that differ only in smoothing share one fit and one search (adjacent in VARIANTS)
        key = (dataclasses.replace(cfg, smoothing_sigma=0.0), n_few)
        if key != shared_key:
            shared_key, shared = key, fit_and_search(cfg, n_few, tok[geometry(cfg)], held)
        start = time.perf_counter()
        maps = np.stack([smooth_map(m, sigma=cfg.map_sigma) for m in shared["maps"]])   # [M, S, S]
        t_score = shared["search_s"] + time.perf_counter() - start
        scores, m = shared["scores"], masks[cfg.input_size]
        rate = len(test) / (len(test) * speed[geometry(cfg), max(cfg.blocks)] + t_score)
        rows.append({"data": root.name, "variant": name, "image_auroc": metrics.auroc(labels, scores),
                     "pixel_auroc": metrics.auroc(m.ravel(), maps.ravel()),
                     "aupro": metrics.aupro(m[labels], maps[labels]), "f1_max": metrics.f1_max(labels, scores),
                     "images_per_s": rate, "fit_s": shared["fit_s"], "bank": shared["bank"]})
        r = rows[-1]
        print(f"| {r['data']} | {name} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
              f"{r['f1_max']:.3f} | {r['images_per_s']:.2f} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+", type=Path)
    ap.add_argument("--only", nargs="+", metavar="VARIANT", choices=list(VARIANTS),
                    help="run these variants only (names as in the table; default: all)")
    ap.add_argument("--json", type=Path, help="also write every row, unrounded, to this file")
    a = ap.parse_args()
    variants = {name: VARIANTS[name] for name in VARIANTS if not a.only or name in a.only}
    print("| data set | variant | image AUROC | pixel AUROC | AUPRO | F1-max | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [row for root in a.datasets for row in run(root, variants)]
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1, default=lambda v: v.item()))  # numpy scalars


if __name__ == "__main__":
    main()
