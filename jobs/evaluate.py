"""Evaluate on an MVTec-AD-layout folder: fit on train/good, score test/, compute the metrics.

Pixel metrics are computed at the model's input resolution (input_size x input_size): heatmaps as
written to Parquet are decoded back, ground-truth masks are resized to that grid with nearest-neighbour
sampling (as the PatchCore reference code evaluates at its input size).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_core import metrics
from anomaly_core.config import ModelConfig
from anomaly_core.images import IMAGE_EXTENSIONS
from anomaly_core.scoring import decode_heatmap
from jobs.analyst import connect
from jobs.fit import run_fit
from jobs.score import run_score

log = logging.getLogger(__name__)


def load_mask(dataset: Path, image: Path, *, size: int) -> np.ndarray:
    """[size, size] bool ground truth of a test image; all False for test/good or when no mask exists."""
    defect = image.parent.name
    mask_path = dataset / "ground_truth" / defect / f"{image.stem}_mask.png"
    if defect == "good" or not mask_path.is_file():
        return np.zeros((size, size), dtype=bool)
    m = Image.open(mask_path).convert("L").resize((size, size), Image.NEAREST)
    return np.asarray(m) > 127


def run_evaluate(dataset: str, out: str, *, config: ModelConfig, batch_size: int = 16,
                 actors: int | None = None, device: str = "auto", address: str | None = None) -> dict:
    root, out_dir = Path(dataset), Path(out)
    for sub in ("train/good", "test"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub} not found: evaluate expects the MVTec AD layout "
                                    f"(train/good, test/<type>, ground_truth/<type>/<stem>_mask.png)")
    manifest = run_fit(str(root / "train" / "good"), str(out_dir / "model"), config=config,
                       batch_size=batch_size, actors=actors, device=device, address=address, overwrite=True)
    scores_dir = out_dir / "scores"
    if scores_dir.exists():                          # a re-run replaces the previous evaluation's scores
        shutil.rmtree(scores_dir)
    summary = run_score(str(root / "test"), str(out_dir / "model"), str(scores_dir), batch_size=batch_size,
                        actors=actors, device=device, address=address)
    con = connect(str(scores_dir))
    rows = con.execute("SELECT uri, score, heatmap_png, heatmap_min, heatmap_max, status FROM scores "
                       "ORDER BY uri").fetchall()
    bad = [r[0] for r in rows if r[5] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} test images could not be scored, e.g. {bad[:3]}")
    paths = [Path(r[0]) for r in rows]
    labels = np.array([p.parent.name != "good" for p in paths])
    scores = np.array([r[1] for r in rows], dtype=np.float64)
    maps = np.stack([decode_heatmap(r[2], r[3], r[4]) for r in rows])             # [N, S, S]
    masks = np.stack([load_mask(root, p, size=config.input_size) for p in paths])  # [N, S, S]
    result = {
        "dataset": str(root),
        "image_auroc": metrics.auroc(labels, scores),
        "pixel_auroc": metrics.auroc(masks.ravel(), maps.ravel()),
        "aupro": metrics.aupro(masks[labels], maps[labels]) if masks.any() else None,
        "f1_max": metrics.f1_max(labels, scores),
        "n_train": manifest["stats"]["n_images"],
        "n_test": len(rows),
        "n_test_anomalous": int(labels.sum()),
        "fit_seconds": manifest["stats"]["fit_seconds"],
        "score_seconds": summary["seconds"],
        "fit_images_per_second": round(manifest["stats"]["n_images"] / manifest["stats"]["fit_seconds"], 2),
        "score_images_per_second": summary["images_per_second"],
        "threshold": manifest["calibration"]["threshold"],
        "verdict_recall": float((scores[labels] >= manifest["calibration"]["threshold"]).mean()),
        "verdict_false_positive_rate": float((scores[~labels] >= manifest["calibration"]["threshold"]).mean()),
        "bank_size": manifest["stats"]["bank_size"],
        "cover_radius": manifest["stats"]["cover_radius"],
        "config": manifest["config"],
        "model_id": manifest["model_id"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    per_image = str(out_dir / "per_image.parquet").replace("'", "''")
    con.execute(
        f"COPY (SELECT uri, regexp_extract(uri, '.*/test/([^/]+)/[^/]+$', 1) AS defect_type, score, "
        f"score_normalised, verdict FROM scores ORDER BY uri) TO '{per_image}' (FORMAT parquet)")
    from jobs.report import write_report
    labels = {str(p): p.parent.name for p in paths}
    write_report(str(scores_dir), str(out_dir / "report.html"), labels=labels,
                 title=f"Evaluation: {root.name}")
    log.info("evaluate: %s", {k: v for k, v in result.items() if k != "config"})
    return result
