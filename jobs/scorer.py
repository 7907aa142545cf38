"""The score job's per-batch step: decoded images -> one output row per image (docs/schema.md).

Heavy set-up (model, bank, backbone) happens once in `__init__`, as in Ray's batch-inference pattern;
the same callable runs without Ray in tests, `anomaly show` and the benchmarks. The method itself is
anomaly_core.model.Model; this module adds what belongs to an audit: run id and time, the product and
line columns, the stored heatmap, error rows.

On a GPU the bank search, the maps and their peaks run on the GPU (Model.backbone places the bank there);
what comes back to the host per image is its score, its G x G grid, its peak and, only when asked for,
its PNG.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch

from anomaly_core.images import size_mismatch
from anomaly_core.index import set_search_threads
from anomaly_core.model import Model
from anomaly_core.scoring import encode_grid, encode_heatmap_png, image_maps, peak_locations
from anomaly_core.storage import StorageOptions
from anomaly_core.threshold import normalise

log = logging.getLogger(__name__)

# a folder starts the URI, follows a '/', or starts a shard member's name (after '#')
_PATH_LABEL = {key: re.compile(rf"(?:^|[/#]){key}=([^/#]+)/") for key in ("product", "line")}


def path_label(uri: str, key: str) -> str:
    """Value of the first Hive-style `key=value` folder in `uri` ("" when absent): archives laid out as
    .../product=P/line=L/... get those as columns without a side table. In a shard's image URI the
    folders of the shard's path come first, then those of the member name (`anomaly pack` keeps them)."""
    m = _PATH_LABEL[key].search(uri)
    return m.group(1) if m else ""


class Scorer:
    """Decoded batch (anomaly_core.decode) -> output rows. Unreadable images become rows with status
    "error" and the error text; the others are scored by the model."""

    def __init__(self, *, model_path: str, device: str = "auto", num_threads: int | None = None,
                 run_id: str = "", run_time: str = "", run_date: str = "", options: StorageOptions | None = None,
                 heatmap_png: bool = False, model_id: str | None = None):
        """model_path: local folder or s3:// URI; num_threads: torch and FAISS threads of this process
        (None: leave both as they are); run_time: ISO-8601 UTC start of the run;
        run_date: the audit date (partition key), by default the date of run_time;
        heatmap_png: also write each map as a PNG (heatmap_png, heatmap_min, heatmap_max; CPU work);
        model_id: the id the model must have (pinned), checked by the load itself before a bank file is read."""
        self.model = Model.load(model_path, options, model_id=model_id)
        self.model.backbone(device=device, num_threads=num_threads)       # loads it, checks the weights
        if num_threads:                    # the bank search gets the threads the backbone gets
            set_search_threads(num_threads)
        self.run_id, self.run_time, self.run_date = run_id, run_time, run_date or run_time[:10]
        self.heatmap_png = heatmap_png
        # CUDA_VISIBLE_DEVICES: the GPU ids Ray assigned this actor (unset outside Ray), whichever device it uses
        term = self.model.stats.image_term
        log.info("scorer: model %s, backbone on %s, bank index %s searched by %s, image term %s, heatmaps as %s, "
                 "CUDA_VISIBLE_DEVICES=%s", self.model.model_id, self.model.device, self.model.bank.kind,
                 self.model.bank.search_path,
                 "off" if term is None else f"block {self.model.config.global_block}, {len(term.vectors)} bank images",
                 "grids and PNGs" if heatmap_png else "grids", os.environ.get("CUDA_VISIBLE_DEVICES"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cal, cfg = self.model.calibration, self.model.config
        n = len(batch["path"])
        ok = batch["error"] == ""
        score = np.full(n, np.nan, dtype=np.float32)
        term = np.full(n, np.nan, dtype=np.float32)
        grid = np.full(n, None, dtype=object)
        pose = np.full(n, None, dtype=object)
        png = np.full(n, None, dtype=object)
        hmin = np.full(n, np.nan, dtype=np.float32)
        hmax = np.full(n, np.nan, dtype=np.float32)
        px = np.full(n, -1, dtype=np.int32)
        py = np.full(n, -1, dtype=np.int32)
        if ok.any():
            idx = np.flatnonzero(ok)
            result = self.model.score(batch["pixels"][ok], maps=False)           # [b] scores, [b, G, G] grids
            maps = image_maps(torch.from_numpy(result.distances).to(self.model.device), out_size=cfg.input_size,
                              sigma=cfg.map_sigma, poses=result.poses)         # [b, S, S], on the device
            score[idx] = result.scores
            if result.image_term_scores is not None:
                term[idx] = result.image_term_scores
            px[idx], py[idx] = peak_locations(maps, widths=batch["width"][ok], heights=batch["height"][ok])
            for j, i in enumerate(idx):
                grid[i] = encode_grid(result.distances[j])
                if result.poses is not None:
                    pose[i] = result.poses[j].astype(np.float32).tolist()
            if self.heatmap_png:
                for j, amap in enumerate(maps.cpu().numpy()):
                    png[idx[j]], hmin[idx[j]], hmax[idx[j]] = encode_heatmap_png(amap)
        # an image far from the training images' sizes is scored, but the model gives it no verdict
        odd = np.array([size_mismatch(int(w), int(h), self.model.stats.input_sizes) if good else ""
                        for w, h, good in zip(batch["width"], batch["height"], ok, strict=True)], dtype=object)
        warn = odd != ""
        verdict = np.where(~ok, "error", np.where(warn, "review",
                                                  np.where(self.model.is_anomalous(score), "anomalous", "normal")))
        return {
            "uri": batch["path"],
            "content_sha256": batch["content_sha256"],
            "width": batch["width"],
            "height": batch["height"],
            "product": np.array([path_label(str(u), "product") for u in batch["path"]], dtype=object),
            "line": np.array([path_label(str(u), "line") for u in batch["path"]], dtype=object),
            "status": np.where(~ok, "error", np.where(warn, "warning", "ok")).astype(object),
            "error": np.where(warn, odd, batch["error"]).astype(object),
            "score": score,
            "score_normalised": normalise(score, cal),
            "verdict": verdict.astype(object),
            "threshold": np.full(n, cal.threshold, dtype=np.float32),
            "image_term_score": term,
            "heatmap_grid": grid,
            "heatmap_size": np.where(ok, cfg.input_size, 0).astype(np.int32),
            "heatmap_sigma": np.where(ok, cfg.map_sigma, np.nan).astype(np.float32),
            "heatmap_pose": pose,
            "heatmap_png": png,
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
