"""Incremental update against a full refit on the union (issue 19 item 3).

    python bench/update.py ../shared/data/mvtec3d_cable_gland --cuts 0,1,2 --model-seeds 0,1,2 --shares 1 --cache DIR

train/good is cut in two by a seeded permutation (--cuts: one cut each): the parent model is fitted on
the first half; then for each share of the second half (--shares) the parent is updated with it
(Model.update_features) and, beside it, a model is refitted on the first half plus that share
(Model.fit_features), and a second refit on the same union that holds out exactly the images the
update calibrates on (the parent's hold-out and the new images' held-out part), so that its bank is
fitted on the images the update's bank holds: update minus that refit is the cost of continuing the
coreset rather than re-selecting it, while update minus the first refit also carries which images the
two hold-outs, drawn independently, leave out of the bank. All are scored on test/ (image AUROC,
threshold, share of the good and of the defective test images flagged; with --pixel also pixel AUROC
over the test images that have ground truth and AUPRO over the defective ones, as jobs/evaluate.py
computes them). --model-seeds repeats each cut with other model seeds (ModelConfig.seed: the hold-out
split, the coreset's projection and start): the spread of the refits over them is the noise floor a
difference between update and refit is judged against. Each row is one run on one machine, so its
ratios compare like with like. The summary gives update minus either refit per row, its mean and
spread, and the refits' own spread within a cut (over model seeds) and across cuts.

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
import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core import metrics  # noqa: E402
from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.features import FeatureExtractor  # noqa: E402
from anomaly_core.fit import SplitPlan, split_calibration  # noqa: E402
from anomaly_core.model import Model  # noqa: E402
from anomaly_core.scoring import image_maps  # noqa: E402
from anomaly_core.update import update_split  # noqa: E402
from bench.features import cache_name, list_images, read_pixels  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a set: image paths, descriptors [N, P, D] float32 unit rows, foreground [N, P] bool."""
    paths: list[Path]
    features: np.ndarray
    foreground: np.ndarray
    seconds_per_image: float


def describe(paths: list[Path], extractor: FeatureExtractor, *, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, G*G, D] float32, foreground [N, G*G] bool) of the image files, as the jobs describe them."""
    feats, fgs = [], []
    for i in range(0, len(paths), batch):
        f, fg = extractor.describe(read_pixels(paths[i:i + batch], extractor.config.input_size))
        feats.append(f)
        fgs.append(fg)
    return np.concatenate(feats), np.concatenate(fgs)


def unit(x: np.ndarray) -> np.ndarray:
    """[..., D] -> float32 rows of norm 1 (the float16 cache rounds them off it)."""
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def features(root: Path, split: str, cfg: ModelConfig, cache: Path | None) -> Split:
    """train/good or test/ of the set, described with `cfg`'s backbone (or read from the cache)."""
    paths = list_images(root / "train" / "good") if split == "train" else list_images(root / "test")
    f = cache / f"update_{root.name}_{cache_name(cfg)}_{split}.npz" if cache else None
    if f is not None and f.exists():
        z = np.load(f)
        if len(z["features"]) != len(paths):
            raise ValueError(f"{f} holds {len(z['features'])} images, {root / split} has {len(paths)}: delete it")
        return Split(paths, unit(z["features"]), z["foreground"], float(z["seconds_per_image"]))
    extractor = FeatureExtractor(config=cfg, device="cpu")
    t0 = time.perf_counter()
    feats, fg = describe(paths, extractor)
    per_image = (time.perf_counter() - t0) / len(paths)
    print(f"  {root.name} {split}: features of {len(paths)} images, {per_image:.3f} s per image", flush=True)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        np.savez(f, features=feats.astype(np.float16), foreground=fg, seconds_per_image=per_image)
    return Split(paths, unit(feats), fg, per_image)


@dataclasses.dataclass(frozen=True)
class TestSet:
    """test/ with its labels [N] bool (defective) and, for --pixel, masks [N, S, S] bool and which
    images have ground truth [N] bool (jobs.evaluate.has_mask: the good ones and the defective with a mask)."""
    split: Split
    labels: np.ndarray
    masks: np.ndarray | None
    masked: np.ndarray | None


def test_set(root: Path, cfg: ModelConfig, cache: Path | None, *, pixel: bool) -> TestSet:
    split = features(root, "test", cfg, cache)
    labels = np.array([p.parent.name != "good" for p in split.paths])
    if not pixel:
        return TestSet(split, labels, None, None)
    from jobs.evaluate import has_mask, load_mask  # imports Ray: only when pixel metrics are asked for
    masked = np.array([has_mask(root, p) for p in split.paths])
    masks = np.stack([load_mask(root, p, size=cfg.input_size) for p in split.paths])
    return TestSet(split, labels, masks, masked)


def quality(model: Model, test: TestSet) -> dict:
    """Image AUROC, threshold, share of the good / defective test images flagged; pixel AUROC and AUPRO
    when the test set has masks (maps of the grids already searched, as the scorer builds them)."""
    result = model.score_features(test.split.features, test.split.foreground, maps=False)
    flagged = model.is_anomalous(result.scores)
    out = {"auroc": round(metrics.auroc(test.labels, result.scores), 4),
           "threshold": round(model.calibration.threshold, 4),
           "good_flagged": round(float(flagged[~test.labels].mean()), 3),
           "defects_flagged": round(float(flagged[test.labels].mean()), 3)}
    if test.masks is not None:
        cfg = model.config
        maps = image_maps(result.distances[test.masked], out_size=cfg.input_size, sigma=cfg.map_sigma)
        masks = test.masks[test.masked]
        out["pixel_auroc"] = round(metrics.auroc(masks.ravel(), maps.ravel()), 4)
        defective = test.labels[test.masked]
        out["aupro"] = round(metrics.aupro(masks[defective], maps[defective]), 4)
    return out


def run(root: Path, train: Split, test: TestSet, *, cfg: ModelConfig, shares: list[float], cut: int) -> dict:
    """Parent on the first half of cut `cut`, then update and refit per share (module docstring)."""
    names = np.array([str(p.relative_to(root)) for p in train.paths])
    order = np.random.default_rng(cut).permutation(len(names))
    first, second = order[:len(order) // 2], order[len(order) // 2:]
    per_image = train.seconds_per_image

    def fit(rows: np.ndarray, config: ModelConfig, plan: SplitPlan | None = None) -> tuple[Model, float]:
        t0 = time.perf_counter()
        m = Model.fit_features(train.features[rows], config=config, foreground=train.foreground[rows],
                               paths=names[rows], plan=plan)
        return m, time.perf_counter() - t0

    parent_plan = split_calibration(list(names[first]), config=cfg)   # the fit's own plan, kept for same_images
    parent, parent_s = fit(first, cfg, plan=parent_plan)
    # the update keeps the parent's image score (its top_fraction, which the fit chose from its own
    # calibration images); the refit uses it too, so that the two compare banks, not image scores
    same_score = parent.config
    parent.manifest = {"model_id": f"bench-parent-{cut}-{cfg.seed}"}       # the id an update records as parent
    out = {"data": root.name, "image_size": cfg.image_size, "tiles": cfg.tiles, "grid": cfg.grid_size,
           "top_fraction": parent.config.top_fraction,
           "train_images": len(names), "test_images": len(test.labels), "cut": cut, "model_seed": cfg.seed,
           "backbone_seconds_per_image": round(per_image, 3),
           "parent": {"images": len(first), "bank": parent.bank.size, "index": parent.bank.kind,
                      "cover_radius": round(parent.stats.cover_radius, 4), "selection_seconds": round(parent_s, 2),
                      **quality(parent, test)},
           "rows": []}
    print(json.dumps({"cut": cut, "model_seed": cfg.seed, "parent": out["parent"]}), flush=True)
    for share in shares:
        new = second[:max(1, round(share * len(second)))]
        t0 = time.perf_counter()
        updated = parent.update_features(train.features[new], foreground=train.foreground[new], paths=names[new])
        update_s = time.perf_counter() - t0
        refit, refit_s = fit(np.concatenate([first, new]), same_score)
        same = same_images(parent_plan, update_split(list(names[new]), config=same_score))
        same_refit = fit(np.concatenate([first, new]), same_score, plan=same)[0] if same is not None else None
        added = updated.lineage["added"]
        row = {"cut": cut, "model_seed": cfg.seed, "share": share, "new_images": len(new),
               "update": {"bank": updated.bank.size, "added": added["vectors"], "candidates": added["candidates"],
                          "new_patches": added["patches"], "cover_radius": round(updated.stats.cover_radius, 4),
                          "stop_radius": round(added["stop_radius"], 4),
                          "selection_seconds": round(update_s, 2),
                          "seconds": round(update_s + per_image * len(new), 1),
                          "calibration": added["calibration"], **quality(updated, test)},
               "refit": {"bank": refit.bank.size, "index": refit.bank.kind,
                         "cover_radius": round(refit.stats.cover_radius, 4),
                         "selection_seconds": round(refit_s, 2),
                         "seconds": round(refit_s + per_image * (len(first) + len(new)), 1),
                         **quality(refit, test)},
               "refit_same_images": ({"bank": same_refit.bank.size, **quality(same_refit, test)}
                                     if same_refit is not None else None),
               "added_at_fit_density": int(np.ceil(cfg.coreset_ratio * added["patches"]))}
        row["auroc_update_minus_refit"] = round(row["update"]["auroc"] - row["refit"]["auroc"], 4)
        if same_refit is not None:
            row["auroc_update_minus_refit_same_images"] = round(
                row["update"]["auroc"] - row["refit_same_images"]["auroc"], 4)
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    return out


def same_images(parent: SplitPlan, new: SplitPlan | None) -> SplitPlan | None:
    """The hold-out plan of a refit on the parent's images followed by the new ones that banks exactly the
    images the update's bank holds and holds out exactly those it calibrates on (the parent's hold-out and
    the new images' held-out part); None when either side is cross-fitted or the new images are all banked
    (there is no single hold-out to copy)."""
    if parent.crossfit or new is None or new.crossfit:
        return None
    return SplitPlan(fold=np.concatenate([parent.fold, new.fold]).astype(np.int16), n_folds=1, crossfit=False)


def spread(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min, max, count."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)) if v.size > 1 else 0.0, 4),
            "min": round(float(v.min()), 4), "max": round(float(v.max()), 4), "n": int(v.size)}


def pooled_sd(rows: list[dict], path: str) -> float | None:
    """Standard deviation of rows[i][path]["auroc"] within cuts (over model seeds), pooled over the cuts;
    None without two seeds of one cut."""
    groups = [[r[path]["auroc"] for r in rows if r["cut"] == c] for c in sorted({r["cut"] for r in rows})]
    dof = sum(len(g) - 1 for g in groups)
    return round(float(np.sqrt(sum(np.var(g) * len(g) for g in groups) / dof)), 4) if dof else None


def summarise(rows: list[dict]) -> dict:
    """Per share: update minus refit over all rows; the refits' (and updates') standard deviation over model
    seeds within each cut (the noise floor), pooled; the refits' range across cuts per model seed."""
    out = {}
    for share in sorted({r["share"] for r in rows}):
        rs = [r for r in rows if r["share"] == share]
        cuts, seeds = sorted({r["cut"] for r in rs}), sorted({r["model_seed"] for r in rs})
        paired = [r for r in rs if r["refit_same_images"]]                # rows with a same-images refit
        out[str(share)] = {
            "update_minus_refit": spread([r["auroc_update_minus_refit"] for r in rs]),
            "update_minus_refit_same_images": (spread([r["auroc_update_minus_refit_same_images"] for r in paired])
                                               if paired else None),
            "update": spread([r["update"]["auroc"] for r in rs]), "refit": spread([r["refit"]["auroc"] for r in rs]),
            "refit_sd_within_cut": pooled_sd(rs, "refit"), "update_sd_within_cut": pooled_sd(rs, "update"),
            "refit_same_images_sd_within_cut": (pooled_sd(rs, "refit_same_images")
                                                if len(paired) == len(rs) else None),
            "refit_range_across_cuts": {s: spread([r["refit"]["auroc"] for r in rs if r["model_seed"] == s])
                                        for s in seeds} if len(cuts) > 1 else None}
        for metric in ("pixel_auroc", "aupro", "good_flagged", "defects_flagged"):
            if metric in rs[0]["refit"]:
                out[str(share)][f"{metric}_update_minus_refit"] = spread(
                    [r["update"][metric] - r["refit"][metric] for r in rs])
                if paired:
                    out[str(share)][f"{metric}_update_minus_refit_same_images"] = spread(
                        [r["update"][metric] - r["refit_same_images"][metric] for r in paired])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--image-size", type=int, default=None, help="Default: the model default's.")
    ap.add_argument("--tiles", type=int, default=None, help="Default: the model default's.")
    ap.add_argument("--index", default=None, help="Memory-bank index (ModelConfig.index); default: the model default.")
    ap.add_argument("--shares", default="0.5,1", help="Shares of the second half added, comma-separated.")
    ap.add_argument("--cuts", default="0", help="Seeds of the cut into halves, comma-separated: one parent each.")
    ap.add_argument("--model-seeds", default="0", help="ModelConfig.seed values, comma-separated: each cut is "
                                                        "run with each (their refits' spread is the noise floor).")
    ap.add_argument("--pixel", action="store_true", help="Pixel AUROC and AUPRO too (imports jobs.evaluate).")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="Write the results here too.")
    a = ap.parse_args()
    given = {k: v for k, v in (("image_size", a.image_size), ("tiles", a.tiles), ("index", a.index)) if v is not None}
    base = ModelConfig(**given)
    train = features(a.dataset, "train", base, a.cache)
    test = test_set(a.dataset, base, a.cache, pixel=a.pixel)
    shares = [float(s) for s in a.shares.split(",")]
    runs = [run(a.dataset, train, test, cfg=dataclasses.replace(base, seed=int(seed)), shares=shares, cut=int(cut))
            for cut in a.cuts.split(",") for seed in a.model_seeds.split(",")]
    summary = {"date": dt.date.today().isoformat(), "runs": len(runs),
               "shares": summarise([r for one in runs for r in one["rows"]])}
    print(json.dumps(summary), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
