"""The score job's per-batch step: decoded images -> one output row per image (docs/schema.md).

Heavy set-up (model, bank, backbone) happens once in `__init__`, as in Ray's batch-inference pattern;
the same callable runs without Ray in tests, `anomaly show` and the benchmarks. The method itself is
anomaly_core.model.Model; this module adds what belongs to an audit: run id and time, the product and
line columns, the encoded heatmap, error rows.
"""

from __future__ import annotations

import re

import numpy as np

from anomaly_core.index import set_search_threads
from anomaly_core.model import Model
from anomaly_core.scoring import encode_heatmap, peak_location
from anomaly_core.storage import StorageOptions
from anomaly_core.threshold import normalise

_PATH_LABEL = {key: re.compile(rf"(?:^|/){key}=([^/]+)/") for key in ("product", "line")}


def path_label(uri: str, key: str) -> str:
    """Value of a Hive-style `key=value` folder in `uri` ("" when absent): archives laid out as
    .../product=P/line=L/... get those as columns without a side table."""
    m = _PATH_LABEL[key].search(uri)
    return m.group(1) if m else ""


class Scorer:
    """Decoded batch (anomaly_core.decode) -> output rows. Unreadable images become rows with status
    "error" and the error text; the others are scored by the model."""

    def __init__(self, *, model_path: str, device: str = "auto", num_threads: int | None = None,
                 run_id: str = "", run_time: str = "", run_date: str = "", options: StorageOptions | None = None):
        """model_path: local folder or s3:// URI; num_threads: torch and FAISS threads of this process
        (None: leave both as they are); run_time: ISO-8601 UTC start of the run;
        run_date: the audit date (partition key), by default the date of run_time."""
        self.model = Model.load(model_path, options)
        self.model.backbone(device=device, num_threads=num_threads)       # loads it, checks the weights
        if num_threads:                    # the bank search gets the threads the backbone gets
            set_search_threads(num_threads)
        self.run_id, self.run_time, self.run_date = run_id, run_time, run_date or run_time[:10]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cal = self.model.calibration
        n = len(batch["path"])
        ok = batch["error"] == ""
        score = np.full(n, np.nan, dtype=np.float32)
        heat = np.empty(n, dtype=object)
        hmin = np.full(n, np.nan, dtype=np.float32)
        hmax = np.full(n, np.nan, dtype=np.float32)
        px = np.full(n, -1, dtype=np.int32)
        py = np.full(n, -1, dtype=np.int32)
        if ok.any():
            result = self.model.score(batch["pixels"][ok])                     # [b] scores, [b, S, S] maps
            for j, i in enumerate(np.flatnonzero(ok)):
                score[i] = result.scores[j]
                heat[i], hmin[i], hmax[i] = encode_heatmap(result.maps[j])
                px[i], py[i] = peak_location(result.maps[j], width=int(batch["width"][i]),
                                             height=int(batch["height"][i]))
        verdict = np.where(~ok, "error", np.where(self.model.is_anomalous(score), "anomalous", "normal"))
        return {
            "uri": batch["path"],
            "content_sha256": batch["content_sha256"],
            "width": batch["width"],
            "height": batch["height"],
            "product": np.array([path_label(str(u), "product") for u in batch["path"]], dtype=object),
            "line": np.array([path_label(str(u), "line") for u in batch["path"]], dtype=object),
            "status": np.where(ok, "ok", "error").astype(object),
            "error": batch["error"],
            "score": score,
            "score_normalised": normalise(score, cal),
            "verdict": verdict.astype(object),
            "threshold": np.full(n, cal.threshold, dtype=np.float32),
            "heatmap_png": heat,
            "heatmap_min": hmin,
            "heatmap_max": hmax,
            "peak_x": px,
            "peak_y": py,
            "model_id": np.full(n, self.model.model_id, dtype=object),
            "model_created_at": np.full(n, self.model.manifest["created_at"], dtype=object),
            "run_id": np.full(n, self.run_id, dtype=object),
            "run_time": np.full(n, self.run_time, dtype=object),
            "run_date": np.full(n, self.run_date, dtype=object),                # partition key
        }
