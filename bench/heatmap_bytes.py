"""Parquet bytes per output row with the heatmap stored as its grid (schema 2) or as a PNG (schema 1).

    python bench/heatmap_bytes.py --data DIR [--train 8] [--images 32]

Fits a model in-process (defaults: 392 px, 28 x 28 grid) on the first `--train` good images of DIR
(MVTec layout), scores the first `--images` test images with the score job's Scorer (PNGs asked for),
and writes the same rows twice the way the score job writes a file (jobs.output.parquet_bytes, zstd):
once with only the grid columns filled (the default), once with only the PNG columns filled (what
version 1 wrote). Prints bytes per row of each file and of the heatmap columns alone.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.decode import decode_batch  # noqa: E402
from anomaly_core.images import IMAGE_EXTENSIONS  # noqa: E402
from anomaly_core.model import Model  # noqa: E402
from jobs.output import parquet_bytes  # noqa: E402
from jobs.scorer import Scorer  # noqa: E402

GRID = ["heatmap_grid", "heatmap_size", "heatmap_sigma", "heatmap_pose"]
PNG = ["heatmap_png", "heatmap_min", "heatmap_max"]


def read(files: list[Path], size: int) -> dict[str, np.ndarray]:
    return decode_batch({"path": np.array([str(f) for f in files], dtype=object),
                         "bytes": np.array([f.read_bytes() for f in files], dtype=object)}, input_size=size)


def column_bytes(data: bytes, columns: list[str]) -> int:
    """Compressed bytes of `columns` in a Parquet file (all row groups)."""
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    return sum(meta.row_group(r).column(c).total_compressed_size for r in range(meta.num_row_groups)
               for c in range(meta.num_columns)
               if meta.row_group(r).column(c).path_in_schema.split(".")[0] in columns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout folder")
    ap.add_argument("--train", type=int, default=8)
    ap.add_argument("--images", type=int, default=32)
    a = ap.parse_args()
    cfg = ModelConfig()

    def images(root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    good = read(images(a.data / "train" / "good")[:a.train], cfg.input_size)
    with tempfile.TemporaryDirectory() as d:
        Model.fit(good["pixels"], config=cfg, names=list(good["path"]), device="cpu").save(f"{d}/m")
        rows = Scorer(model_path=f"{d}/m", device="cpu", heatmap_png=True, run_id="r",
                      run_time="2026-12-02T00:00:00+00:00")(read(images(a.data / "test")[:a.images], cfg.input_size))
    table = pa.Table.from_pydict({k: list(v) for k, v in rows.items()})
    n = table.num_rows
    print(f"{n} rows, grid {cfg.grid_size} x {cfg.grid_size}, map {cfg.input_size} px, zstd")
    print("| stored heatmap | file bytes per row | heatmap columns bytes per row |")
    print("| --- | --- | --- |")
    for name, keep, drop in (("grid (schema 2, default)", GRID, PNG), ("PNG (schema 1)", PNG, GRID)):
        t = table
        for c in drop:
            t = t.set_column(t.schema.get_field_index(c), c, pa.nulls(n, t.schema.field(c).type))
        data = parquet_bytes(t)
        print(f"| {name} | {len(data) / n:,.0f} | {column_bytes(data, keep) / n:,.0f} |")


if __name__ == "__main__":
    main()
