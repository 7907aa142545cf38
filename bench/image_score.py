"""Image scores compared on one bank: re-score `anomaly evaluate` outputs from what they stored.

    anomaly evaluate ../shared/data/mvtec3d_cable_gland --out OUT/cable_gland
    python bench/image_score.py OUT/cable_gland OUT/magnetic_tile [--patches 1,2,3,4,5,6,8] [--json rows.json]

Each evaluate output holds its model (MODEL/calibration_grids.npy: the patch distances of the calibration
images against the bank that scored them, anomaly_core.fit.CalibrationPatches) and one row per test
image with its patch-distance grid (heatmap_grid, float16). So every image score can be computed on the
same bank and the same calibration images, without a fit per variant: topk_mean over k patches
(top_fraction = k / G^2) for each --patches value, and smoothed_max at sigma 0.5 and 1. Each is calibrated
at --false-alarm-rate on the calibration grids as the fit calibrates (anomaly_core.threshold.calibrate),
and the rows give image AUROC, F1-max, the verdict recall / false-alarm rate on test/ at that threshold,
and the recall at 1% / 5% false alarms read off the ROC curve (test labels). Labels: an image under
test/good is normal. The float16 grids round scores by about 1e-3 relative, so a row can differ from
a fit with that image score in the fourth decimal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core import metrics  # noqa: E402
from anomaly_core.scoring import decode_grid, image_scores  # noqa: E402
from anomaly_core.threshold import calibrate  # noqa: E402
from jobs.evaluate import REPORTED_RATES  # noqa: E402


def load(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test grids [N, G, G] float32, test labels [N] bool, calibration grids [C, G, G] float32) of an
    evaluate output folder."""
    cal = np.load(out / "model" / "calibration_grids.npy")                                  # [C, G*G]
    g = int(round(cal.shape[1] ** 0.5))
    rows = duckdb.sql(f"SELECT uri, heatmap_grid FROM read_parquet('{out}/scores/run_date=*/*.parquet') "
                      f"WHERE status != 'error' ORDER BY uri").fetchall()
    labels = np.array(["/test/good/" not in uri for uri, _ in rows])
    return np.stack([decode_grid(grid) for _, grid in rows]), labels, cal.reshape(-1, g, g)


def row(name: str, grids: np.ndarray, labels: np.ndarray, cal_grids: np.ndarray, *, rate: float,
        options: dict) -> dict:
    s = image_scores(grids, **options)                                                     # [N]
    cal = calibrate(image_scores(cal_grids, **options), false_alarm_rate=rate)
    flag = s >= cal.threshold
    return {"image_score": name, "image_auroc": metrics.auroc(labels, s), "f1_max": metrics.f1_max(labels, s),
            "recall": float(flag[labels].mean()), "false_alarms": float(flag[~labels].mean()),
            "threshold": cal.method,
            **{f"roc_recall@{r:g}": metrics.recall_at_false_alarm_rate(labels, s, r) for r in REPORTED_RATES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", type=Path, help="anomaly evaluate --out folders")
    ap.add_argument("--patches", default="1,2,3,4,5,6,8", help="k of the topk_mean rows, comma-separated")
    ap.add_argument("--false-alarm-rate", type=float, default=0.05)
    ap.add_argument("--json", type=Path, help="also write every row, unrounded, to this file")
    a = ap.parse_args()
    print("| output | image score | image AUROC | F1-max | verdict recall / false alarms | ROC recall 1% / 5% |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for out in a.outputs:
        grids, labels, cal_grids = load(out)
        p = grids.shape[1] * grids.shape[2]
        variants = {f"topk_mean {k} of {p}": {"reduction": "topk_mean", "top_fraction": k / p, "sigma": 0.5}
                    for k in (int(k) for k in a.patches.split(","))}
        variants |= {f"smoothed_max {s}": {"reduction": "smoothed_max", "top_fraction": 0.01, "sigma": s}
                     for s in (0.5, 1.0)}
        for name, options in variants.items():
            r = {"output": out.name, **row(name, grids, labels, cal_grids, rate=a.false_alarm_rate, options=options)}
            rows.append(r)
            print(f"| {out.name} | {name} | {r['image_auroc']:.4f} | {r['f1_max']:.4f} | {r['recall']:.3f} / "
                  f"{r['false_alarms']:.3f} | " + " / ".join(f"{r[f'roc_recall@{x:g}']:.3f}" for x in REPORTED_RATES)
                  + " |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1, default=lambda v: v.item()))


if __name__ == "__main__":
    main()
