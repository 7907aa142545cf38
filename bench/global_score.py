"""A global term beside the patch score: how far an image's mean descriptor lies from the good images'.

The term is built (`--global-block`, anomaly_core.image_term: the maximum below, standardised the same
way, with the model's own threshold); this bench compares blocks and combinations on one evaluation
without refitting, and breaks image AUROC down by defect type.

    python bench/global_score.py OUT [OUT ...] [--global-blocks 4,5] [--distance nn,gaussian] [--data DATASET]

OUT is what `anomaly evaluate DATASET --out OUT` wrote (its model, fitted with a hold-out, and its
scores). Patch kNN scores each patch on its own, so a part whose every patch is normal but whose shape is
not (a bent gland) scores like a good one. The global term: each image's descriptor is the mean of its
unit patch tokens of one block, L2-normalised ([D]); its score is the cosine distance to the nearest
descriptor of the model's bank images (`--distance nn`, what the library builds), or the Mahalanobis
distance to their mean under their Ledoit-Wolf shrunk covariance (`gaussian`: one Gaussian of normal
images, as in Rippel et al. 2020, arXiv 2005.14140, on pooled features). Each score (the model's own
image score, the global distance) is standardised by its held-out normal images (z-score of its
logarithm) and the two are combined by their maximum (a union of two calibrated detectors) or mean
(pooled evidence); the threshold is set on the combined held-out scores exactly as the fit sets its own
(anomaly_core.threshold.calibrate).
Rows: image AUROC, F1-max, verdict recall / false alarms on test/ at that threshold, ROC recall at 1% /
5% (test labels), for the model alone and each combination; then the image AUROC per defect type. The
backbone runs once per block over train/good and test/ (in-process, no Ray); the patch scores are the
evaluation's, read from its Parquet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core import metrics  # noqa: E402
from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.image_term import image_descriptors, image_distances  # noqa: E402
from anomaly_core.threshold import calibrate  # noqa: E402
from bench.features import extract, list_images  # noqa: E402
from bench.verdict import verdict  # noqa: E402
from jobs.analyst import connect  # noqa: E402
from jobs.evaluate import REPORTED_RATES  # noqa: E402


def descriptors(paths: list[Path], cfg: ModelConfig, block: int) -> np.ndarray:
    """[N, D] float32 unit rows: the images' descriptors of `block` (anomaly_core.image_term)."""
    return image_descriptors(extract(paths, dataclasses.replace(cfg, blocks=(block,))))     # [N, D]


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """[n, D] samples -> [D, D] float64 covariance shrunk towards a scaled identity by the Ledoit-Wolf
    (2004) intensity, the estimator of sklearn.covariance.ledoit_wolf (n well below D needs it)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    xc = x - x.mean(axis=0)                                                            # [n, D]
    emp = xc.T @ xc / n                                                                # [D, D]
    mu = np.trace(emp) / d
    dispersion = np.sum(emp ** 2) - 2 * mu * np.trace(emp) + d * mu ** 2              # ||emp - mu I||_F^2
    spread = np.sum((xc ** 2).T @ (xc ** 2)) / n - np.sum(emp ** 2)    # sum_k ||x_k x_k^T - emp||_F^2 / n
    shrink = min(spread / n, dispersion) / dispersion if dispersion > 0 else 1.0
    return (1 - shrink) * emp + shrink * mu * np.eye(d)


def gaussian_distances(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[B, D] descriptors -> [B] Mahalanobis distances to the [M, D] bank descriptors' mean (ledoit_wolf)."""
    precision = np.linalg.inv(ledoit_wolf(bank))                                       # [D, D]
    d = np.asarray(queries, dtype=np.float64) - bank.mean(axis=0)                      # [B, D]
    return np.sqrt(np.einsum("bd,de,be->b", d, precision, d))


DISTANCES = {"nn": image_distances, "gaussian": gaussian_distances}


def log_z(scores: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Scores in standard deviations of the normal scores' logarithm from their mean."""
    ln = np.log(normal)
    return (np.log(scores) - ln.mean()) / ln.std()


def rows_for(out: Path, data: Path | None, blocks: list[int], distances: list[str]) -> list[dict]:
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    cfg, stats = ModelConfig.from_dict(manifest["config"]), manifest["stats"]
    if stats["calibration_split"] != "holdout":
        raise SystemExit(f"{out}: calibrated by {stats['calibration_split']}; this bench needs a hold-out "
                         f"(anomaly evaluate ... --calibration holdout)")
    con = connect(str(out / "scores"))
    test = con.execute("SELECT uri, score FROM scores WHERE status != 'error' ORDER BY uri").fetchall()
    test_paths = [Path(u) for u, _ in test]
    data = data or test_paths[0].parents[2]
    labels = np.array([p.parent.name != "good" for p in test_paths])
    patch = np.array([s for _, s in test], dtype=np.float64)                          # [T] the model's scores
    held_names = set(stats["calibration_images"])
    train = list_images(data / "train" / "good")
    held = np.array([str(p) in held_names for p in train])                            # [N] held-out mask
    if held.sum() != len(held_names):
        raise SystemExit(f"{out}: {len(held_names)} calibration images recorded, {held.sum()} found under {data}")
    order = [str(p) for p in train if str(p) in held_names]                            # held-out, listing order
    recorded = dict(zip(stats["calibration_images"], stats["calibration_scores"], strict=True))
    patch_held = np.array([recorded[n] for n in order], dtype=np.float64)             # [C]
    rate = cfg.false_alarm_rate

    types = np.array([p.parent.name for p in test_paths])                             # [T] defect type or good

    def row(name: str, s: np.ndarray, h: np.ndarray) -> dict:
        thr = calibrate(np.exp(h), false_alarm_rate=rate).threshold                   # exp: calibrate's units > 0
        recall, far = verdict(np.exp(s), labels, thr)
        return {"data": data.name, "blocks": "+".join(map(str, cfg.blocks)), "score": name,
                "image_auroc": metrics.auroc(labels, s), "f1_max": metrics.f1_max(labels, s),
                "recall": recall, "false_alarms": far,
                **{f"roc_recall_{r:g}": metrics.recall_at_false_alarm_rate(labels, s, r) for r in REPORTED_RATES},
                # each defect type against every normal test image
                "auroc_per_type": {t: metrics.auroc(labels[(types == t) | ~labels], s[(types == t) | ~labels])
                                   for t in sorted(set(types[labels]))}}

    zp, zph = log_z(patch, patch_held), log_z(patch_held, patch_held)
    rows = [row("patch (the model)", zp, zph)]
    for b in blocks:
        g_train = descriptors(train, cfg, b)                                         # [N, D]
        g_test = descriptors(test_paths, cfg, b)                                     # [T, D]
        bank = g_train[~held]
        for name in distances:
            tag = f"global {'' if name == 'nn' else 'gaussian '}{b}"
            d_held = DISTANCES[name](g_train[held], bank)                                # held: as `order`
            zg, zgh = log_z(DISTANCES[name](g_test, bank), d_held), log_z(d_held, d_held)
            rows.append(row(f"{tag} alone", zg, zgh))
            rows.append(row(f"max(patch, {tag})", np.maximum(zp, zg), np.maximum(zph, zgh)))
            rows.append(row(f"mean(patch, {tag})", (zp + zg) / 2, (zph + zgh) / 2))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outs", nargs="+", type=Path, help="folders written by `anomaly evaluate --out`")
    ap.add_argument("--global-blocks", default="4,5", help="comma-separated blocks of the global descriptor")
    ap.add_argument("--distance", default="nn", help=f"comma-separated image distances, of {sorted(DISTANCES)}")
    ap.add_argument("--data", type=Path, default=None, help="the data set (default: read from the scored uris)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    blocks = [int(b) for b in args.global_blocks.split(",")]
    distances = args.distance.split(",")
    if unknown := sorted(set(distances) - set(DISTANCES)):
        raise SystemExit(f"--distance {','.join(unknown)}: unknown; choose from {sorted(DISTANCES)}")
    rows = [r for out in args.outs for r in rows_for(out, args.data, blocks, distances)]
    print("| data set | patch blocks | image score | image AUROC | F1-max | recall / false alarms "
          "| ROC recall 1% / 5% |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['data']} | {r['blocks']} | {r['score']} | {r['image_auroc']:.4f} | {r['f1_max']:.4f} | "
              f"{r['recall']:.3f} / {r['false_alarms']:.3f} | "
              f"{r['roc_recall_0.01']:.3f} / {r['roc_recall_0.05']:.3f} |")
    print("\nImage AUROC per defect type (against every normal test image):\n")
    for r in rows:
        print(f"- {r['data']}, {r['blocks']}, {r['score']}: "
              + ", ".join(f"{t} {a:.3f}" for t, a in r["auroc_per_type"].items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
