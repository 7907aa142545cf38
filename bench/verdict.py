"""Verdict ablation on MVTec-AD-layout data sets: image scores, thresholds in false-alarm units, few shots.

    python bench/verdict.py ../shared/data/mvtec3d_cable_gland ../shared/data/mpdd_metal_plate \
        ../shared/data/hazelnut_toy ../shared/data/magnetic_tile --cache CACHE_DIR --json rows.json
    python bench/verdict.py ../shared/data/mpdd_metal_plate --few-shot 1,2,4,8,16 --seeds 0,1,2 --cache CACHE_DIR
        [--global-block 4]

Scores. For each geometry (--tiles), one model is fitted on train/good with the default config and
calibration="holdout", so that every image score is calibrated on the same held-out images against the
same bank: their patch grids are scored once (anomaly_core.model.Model.score_features) and each reduction is
calibrated on them with anomaly_core.threshold.calibrate at 1% and 5%. Rows give image AUROC, pixel AUROC,
AUPRO (maps at the input size), F1-max, the verdict recall / false-alarm rate on test/ at each calibrated
threshold, and the recall at 1% / 5% false alarms read off the ROC curve (test labels: what the scores
allow, not what a user gets). `anomaly evaluate` gives the product's figures (cross-fitted calibration).

Few shots. n good images (a seeded draw from train/good), the default config (cross-fitted calibration,
anomaly_core.fit.split_calibration), scored on test/: image AUROC, verdict recall and false-alarm rate,
and the rate bound the calibration reports. n = 1 has no normal score to calibrate on: AUROC only, the
bank being the image's patches.

--cache DIR keeps the backbone tokens of each set (float16, FeatureExtractor.tokens at the default config
and --tiles), so that reruns skip the backbone.
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
from anomaly_core.align import align_images  # noqa: E402
from anomaly_core.config import SMOOTH_TOP_FRACTION, ModelConfig  # noqa: E402
from anomaly_core.features import FeatureExtractor, describe_images, describe_tokens, split_tokens  # noqa: E402
from anomaly_core.index import MemoryBank  # noqa: E402
from anomaly_core.model import Model, score_features  # noqa: E402
from anomaly_core.scoring import image_scores  # noqa: E402
from anomaly_core.threshold import calibrate  # noqa: E402
from bench.features import cache_name, list_images, read_pixels  # noqa: E402
from jobs.evaluate import REPORTED_RATES, load_mask  # noqa: E402

# name -> image-score options (ModelConfig fields); every row shares its geometry's bank and hold-out
REDUCTIONS = {
    "topk_mean 1%": {"reduction": "topk_mean", "top_fraction": 0.01},
    "topk_mean 0.5%": {"reduction": "topk_mean", "top_fraction": 0.005},
    "topk_mean 0.25%": {"reduction": "topk_mean", "top_fraction": 0.0025},
    "max": {"reduction": "max"},
    "smoothed_max 0.5": {"reduction": "smoothed_max", "score_sigma": 0.5},
    "smoothed_max 1.0": {"reduction": "smoothed_max", "score_sigma": 1.0},
}


def tokens(root: Path, split: str, cfg: ModelConfig, cache: Path | None) -> tuple[list[Path], np.ndarray]:
    """Paths and backbone tokens [N, G*G, D (+ D')] float32 of train/good or test/ (turned to their
    canonical pose first when cfg.align): the patch blocks' unit rows, then the global block's."""
    paths = list_images(root / "train" / "good") if split == "train" else list_images(root / "test")
    suffix = "_aligned" if cfg.align else ""
    f = cache / f"{root.name}_{cache_name(cfg)}_{split}{suffix}.npy" if cache else None
    if f is not None and f.exists():
        tok = np.load(f).astype(np.float32)
    else:
        ex, out, t0 = FeatureExtractor(config=cfg), [], time.perf_counter()
        for i in range(0, len(paths), 8):
            px = read_pixels(paths[i:i + 8], cfg.input_size)                           # [b, S, S, 3]
            out.append(ex.tokens(align_images(px)[0] if cfg.align else px))            # [b, G*G, D]
        tok = np.concatenate(out)
        print(f"  {root.name} {split}{suffix}: tokens of {len(paths)} images in {time.perf_counter() - t0:.0f}s",
              flush=True)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            np.save(f, tok.astype(np.float16))
    # the float16 cache rounds the rows: each part back to unit length
    parts = [p for p in split_tokens(tok, config=cfg) if p is not None]
    return paths, np.concatenate([p / np.linalg.norm(p, axis=-1, keepdims=True) for p in parts], axis=-1)


def verdict(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(recall on anomalous images, false-alarm rate on normal ones) of "score >= threshold"."""
    flag = scores >= threshold
    return float(flag[labels].mean()), float(flag[~labels].mean())


def score_rows(root: Path, tiles: int, cache: Path | None) -> list[dict]:
    cfg = ModelConfig(tiles=tiles, calibration="holdout")
    train_paths, train = tokens(root, "train", cfg, cache)
    test_paths, test = tokens(root, "test", cfg, cache)
    labels = np.array([p.parent.name != "good" for p in test_paths])
    masks = np.stack([load_mask(root, p, size=cfg.input_size) for p in test_paths])       # [M, S, S]
    f_train, fg_train = describe_tokens(train, config=cfg)
    f_test, fg_test = describe_tokens(test, config=cfg)
    t0 = time.perf_counter()
    model = Model.fit_features(f_train, config=cfg, foreground=fg_train, paths=[str(p) for p in train_paths])
    held = np.isin([str(p) for p in train_paths], model.stats.calibration_images)           # [N] bool
    held_grids = model.score_features(f_train[held], fg_train[held], maps=False).distances
    result = model.score_features(f_test, fg_test)                                         # grids + maps
    fit_s = time.perf_counter() - t0
    defect = labels & masks.reshape(len(masks), -1).any(axis=1)
    pixel = {"pixel_auroc": metrics.auroc(masks.ravel(), result.maps.ravel()),
             "aupro": metrics.aupro(masks[defect], result.maps[defect])}
    rows = []
    for name, opts in REDUCTIONS.items():
        c = dataclasses.replace(model.config, **opts)
        s_test = image_scores(result.distances, **c.score_options)
        s_held = image_scores(held_grids, **c.score_options)
        row = {"data": root.name, "tiles": tiles, "grid": cfg.grid_size, "image_score": name,
               "image_auroc": metrics.auroc(labels, s_test), **pixel, "f1_max": metrics.f1_max(labels, s_test),
               "n_calibration": int(held.sum()), "bank": model.bank.size, "fit_s": round(fit_s, 1)}
        for rate in REPORTED_RATES:
            cal = calibrate(s_held, false_alarm_rate=rate)
            if c.score_options == model.config.score_options and rate == cfg.false_alarm_rate:   # the fit's own
                assert abs(cal.threshold - model.calibration.threshold) < 1e-6, (cal, model.calibration)
            row[f"recall@{rate:g}"], row[f"false_alarms@{rate:g}"] = verdict(s_test, labels, cal.threshold)
            row[f"threshold@{rate:g}"] = cal.method
            row[f"roc_recall@{rate:g}"] = metrics.recall_at_false_alarm_rate(labels, s_test, rate)
        rows.append(row)
        print(f"| {root.name} | {tiles} | {name} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} | "
              f"{row['aupro']:.4f} | {row['f1_max']:.4f} | "
              + " | ".join(f"{row[f'recall@{r:g}']:.3f} / {row[f'false_alarms@{r:g}']:.3f}" for r in REPORTED_RATES)
              + " | " + " / ".join(f"{row[f'roc_recall@{r:g}']:.3f}" for r in REPORTED_RATES) + " |", flush=True)
    return rows


def few_shot_rows(root: Path, shots: list[int], seeds: list[int], cache: Path | None, options: dict) -> list[dict]:
    cfg = dataclasses.replace(ModelConfig(), **options)
    train_paths, train = tokens(root, "train", cfg, cache)
    test_paths, test = tokens(root, "test", cfg, cache)
    labels = np.array([p.parent.name != "good" for p in test_paths])
    f_train, fg_train = describe_tokens(train, config=cfg)
    f_test, fg_test = describe_tokens(test, config=cfg)
    term = cfg.global_block is not None
    g_train = describe_images(train, config=cfg) if term else None                       # [N, D'] or None
    g_test = describe_images(test, config=cfg) if term else None
    rows = []
    for n in shots:
        for seed in seeds:
            pick = np.random.default_rng(seed).permutation(len(train_paths))[:n]                # [n]
            if n == 1:              # nothing to calibrate on (nor to standardise an image term): patches only
                bank = MemoryBank.build(f_train[pick[0]][fg_train[pick[0]]])
                # no calibration image, so no quantile: the image score a fit without one chooses
                one = cfg if cfg.top_fraction else dataclasses.replace(cfg, top_fraction=SMOOTH_TOP_FRACTION)
                scores = score_features(f_test, bank, config=one, foreground=fg_test).scores
                row = {"image_auroc": metrics.auroc(labels, scores)}
            else:
                names = [str(train_paths[i]) for i in pick]
                if cfg.n_augment > 1 or cfg.align:     # copies and poses are made from pixels: fit from them
                    model = Model.fit(read_pixels([train_paths[i] for i in pick], cfg.input_size), config=cfg,
                                      names=names)
                else:
                    model = Model.fit_features(f_train[pick], config=cfg, foreground=fg_train[pick], paths=names,
                                               images=g_train[pick] if term else None)
                scores = model.score_features(f_test, fg_test, images=g_test).scores
                recall, far = verdict(scores, labels, model.calibration.threshold)
                row = {"image_auroc": metrics.auroc(labels, scores), "recall": recall, "false_alarms": far,
                       "threshold": model.calibration.method, "split": model.stats.calibration_split,
                       "expected_rate": model.calibration.expected_rate}
            rows.append({"data": root.name, "shots": n, "seed": seed, "options": options, **row})
        group = [r for r in rows if r["shots"] == n]
        mean = {k: np.mean([r[k] for r in group]) for k in ("image_auroc", "recall", "false_alarms", "expected_rate")
                if k in group[0]}
        print(f"| {root.name} | {n} | {len(group)} | {mean['image_auroc']:.4f} | "
              + (f"{mean['recall']:.3f} | {mean['false_alarms']:.3f} | {mean['expected_rate']:.3f} |" if n > 1
                 else "- | - | - |"), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+", type=Path)
    ap.add_argument("--tiles", default="2", help="geometries of the score ablation, e.g. 2,3")
    ap.add_argument("--few-shot", default="", help="shot counts of the few-shot table, e.g. 1,2,4,8,16")
    ap.add_argument("--seeds", default="0,1,2", help="draws per shot count")
    ap.add_argument("--reduction", default="", help="few-shot image score (default: the config's)")
    ap.add_argument("--top-fraction", type=float, help="few-shot topk_mean fraction (default: the config's)")
    ap.add_argument("--false-alarm-rate", type=float, help="few-shot target rate (default: the config's)")
    ap.add_argument("--augment", default="", help="few-shot bank augmentation, e.g. rotations or turns8 (the fits "
                                                  "then run the backbone on the copies)")
    ap.add_argument("--align", action="store_true", help="few-shot fits and test images turned to a canonical pose")
    ap.add_argument("--blocks", default="", help="few-shot feature blocks, e.g. 2,4 (default: the config's)")
    ap.add_argument("--global-block", type=int, help="few-shot image-level term's block, e.g. 4 (default: off)")
    ap.add_argument("--cache", type=Path, help="folder for the backbone tokens of each set")
    ap.add_argument("--json", type=Path, help="also write every row, unrounded, to this file")
    a = ap.parse_args()
    rows = []
    if a.few_shot:
        options = {k: v for k, v in (("reduction", a.reduction), ("top_fraction", a.top_fraction),
                                     ("false_alarm_rate", a.false_alarm_rate), ("augment", a.augment),
                                     ("align", a.align)) if v}
        if a.blocks:
            options["blocks"] = tuple(int(b) for b in a.blocks.split(","))
        if a.global_block is not None:
            options["global_block"] = a.global_block
        print("| data set | good images | draws | image AUROC | verdict recall | false-alarm rate | rate bound |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for root in a.datasets:
            rows += few_shot_rows(root, [int(s) for s in a.few_shot.split(",")],
                                  [int(s) for s in a.seeds.split(",")], a.cache, options)
    else:
        print("| data set | tiles | image score | image AUROC | pixel AUROC | AUPRO | F1-max | recall / false alarms, "
              "1% threshold | recall / false alarms, 5% threshold | ROC recall at 1% / 5% |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for root in a.datasets:
            for tiles in (int(t) for t in a.tiles.split(",")):
                rows += score_rows(root, tiles, a.cache)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1, default=lambda v: v.item()))     # numpy scalars


if __name__ == "__main__":
    main()
