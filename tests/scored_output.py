"""Generated scored outputs, laid out as the score job commits them (Parquet per night, a run summary),
for tests of what reads outputs (queries, the review page, drift) without fitting or scoring anything."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from anomaly_core import storage
from anomaly_core.schema import PARTITION_COLUMN, output_schema
from anomaly_core.scoring import encode_grid
from anomaly_core.shards import pack_tar
from jobs import output
from tests.helpers import png_bytes

NORMAL_MEAN, THRESHOLD = 0.20, 0.40          # the generated model's calibration (cosine distances)
NORMAL_STD = 0.05


def write_output(out: str | Path, nights: dict[str, int], *, seed: int = 0, products=("brick", "tile"),
                 lines=("L1", "L2"), defect_rate: float = 0.05, shift: dict[str, float] | None = None,
                 images: Path | None = None, grid: int = 4, rows_per_file: int = 10_000,
                 errors: int = 0, tar: bool = False) -> pa.Table:
    """Write one complete run per night ({run_date: images}) under `out`; returns every row written
    (output schema with run_date).

    Normal images score N(NORMAL_MEAN + shift[night], NORMAL_STD), defects (a share `defect_rate`, at
    random) N(THRESHOLD + 0.1, NORMAL_STD); product and line cycle over the rows. images: write each
    image as a small PNG there (its uri is that file, its content_sha256 that of the bytes) and make a
    defect's grid hot in its top-left quarter; without it the uris name no file and the content hash is
    that of the uri. tar: with images, put each night's images in one tar shard, `<images>/<night>.tar`,
    and name them by their member uri (`<shard>#<member>`) instead. errors: the last rows of each night
    are error rows (no score, no heatmap), as an unreadable image gives."""
    rng = np.random.default_rng(seed)
    tables = []
    for night, n in nights.items():
        run_id = f"{night}-gen"
        defect = rng.random(n) < defect_rate
        score = np.where(defect, THRESHOLD + 0.1, NORMAL_MEAN + (shift or {}).get(night, 0.0))
        score = (score + NORMAL_STD * rng.standard_normal(n)).astype(np.float32)
        product = [products[i % len(products)] for i in range(n)]
        line = [lines[(i // len(products)) % len(lines)] for i in range(n)]
        uris, shas, grids, members = [], [], [], []
        root = str(images) if images is not None else "/archive"
        for i in range(n):
            member = f"product={product[i]}/line={line[i]}/img_{i:06d}.png"
            uri = f"{root}/{night}.tar#{member}" if tar and images is not None else f"{root}/{night}/{member}"
            g = np.full((grid, grid), score[i] * 0.8, np.float32)
            if defect[i]:
                g[: grid // 2, : grid // 2] = score[i] * 1.5
            if images is not None:
                pixels = rng.integers(60, 200, (24, 32, 3), dtype=np.uint8)
                data = png_bytes(pixels)
                if tar:
                    members.append((member, data))
                else:
                    Path(uri).parent.mkdir(parents=True, exist_ok=True)
                    Path(uri).write_bytes(data)
                shas.append(hashlib.sha256(data).hexdigest())
            else:
                shas.append(hashlib.sha256(uri.encode()).hexdigest())
            uris.append(uri)
            grids.append(encode_grid(g))
        if members:
            Path(images).mkdir(parents=True, exist_ok=True)
            (Path(images) / f"{night}.tar").write_bytes(pack_tar(members))
        verdict = np.where(score >= THRESHOLD, "anomalous", "normal")
        cols = {
            "uri": uris, "content_sha256": shas, "width": np.full(n, 32, np.int32),
            "height": np.full(n, 24, np.int32), "product": product, "line": line, "status": ["ok"] * n,
            "error": [""] * n, "score": score,
            "score_normalised": ((score - NORMAL_MEAN) / (THRESHOLD - NORMAL_MEAN)).astype(np.float32),
            "verdict": verdict, "threshold": np.full(n, THRESHOLD, np.float32),
            "image_term_score": np.full(n, np.nan, np.float32), "heatmap_grid": grids,
            "heatmap_size": np.full(n, 16, np.int32), "heatmap_sigma": np.full(n, 1.0, np.float32),
            "heatmap_pose": [None] * n, "heatmap_png": [None] * n, "heatmap_min": np.full(n, np.nan, np.float32),
            "heatmap_max": np.full(n, np.nan, np.float32), "peak_x": np.full(n, 8, np.int32),
            "peak_y": np.full(n, 6, np.int32), "model_id": ["0123456789abcdef"] * n,
            "model_created_at": ["2026-11-01T00:00:00+00:00"] * n, "run_id": [run_id] * n,
            "run_time": [f"{night}T02:00:00+00:00"] * n, PARTITION_COLUMN: [night] * n}
        if errors:
            bad = np.arange(n) >= n - errors
            cols["score"] = np.where(bad, np.nan, cols["score"]).astype(np.float32)
            cols["score_normalised"] = np.where(bad, np.nan, cols["score_normalised"]).astype(np.float32)
            cols["verdict"] = np.where(bad, "error", verdict)
            cols["status"] = np.where(bad, "error", "ok")
            cols["error"] = np.where(bad, "cannot decode image", "")
            cols["heatmap_grid"] = [None if b else g for b, g in zip(bad, grids, strict=True)]
        table = pa.table(cols).cast(output_schema(include_partition=True))
        for s in range(0, n, rows_per_file):
            part = table.slice(s, rows_per_file)
            name = f"{run_id}-{output.part_name(part['uri'].to_pylist())}.parquet"
            storage.write_bytes(storage.join(output.partition_uri(str(out), night), name),
                                output.parquet_bytes(part))
        output.write_summary(str(out), run_id, {"run_id": run_id, "run_date": night, **output.count_rows(table)})
        tables.append(table)
    return pa.concat_tables(tables)


def move_images(out: str | Path, old: str, new: str) -> None:
    """Rewrite the committed files of `out` with the prefix `old` of every uri replaced by `new`, as if
    the images had been moved there (the content hashes stay)."""
    for f in sorted(Path(out).glob(f"{PARTITION_COLUMN}=*/*.parquet")):
        table = pq.ParquetFile(f).read()
        uris = [new + u[len(old):] if u.startswith(old) else u for u in table["uri"].to_pylist()]
        table = table.set_column(table.schema.get_field_index("uri"), table.schema.field("uri"), pa.array(uris))
        f.write_bytes(output.parquet_bytes(table))
