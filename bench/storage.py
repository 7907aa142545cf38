"""Scoring from a local S3 server against scoring from local disk: same images, same model, one run each.

    python bench/storage.py [--images 5000] [--size 64] [--image-size 112]

Starts moto_server on 127.0.0.1 (as the tests do), writes N small PNG parts (crops of real texture
photographs, with drawn defects in half of them) to disk and to a bucket, fits one model, then runs
`anomaly score` once on each archive, each in a fresh process, and prints images/s, their ratio and the
driver's peak RSS (the process that lists the archive and gathers the summary).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.storage import StorageOptions  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402

ONE_RUN = r"""
import json, resource, sys, time
from anomaly_core.storage import StorageOptions
from jobs.runtime import ensure_ray
from jobs.score import run_score
data, model, out, endpoint, batch = sys.argv[1:6]
ensure_ray(None)                                   # Ray start-up is not part of the figure
t0 = time.time()
s = run_score(data, model, out, batch_size=int(batch), run_date="2026-11-22",
              options=StorageOptions(endpoint_url=endpoint or None))
s["wall_seconds"] = round(time.time() - t0, 2)
s["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print("RESULT " + json.dumps(s))
"""


def one_run(data: str, model: str, out: str, endpoint: str, batch: int) -> dict:
    p = subprocess.run([sys.executable, "-c", ONE_RUN, data, model, out, endpoint, str(batch)],
                       capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"score run failed:\n{p.stderr[-4000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", type=int, default=64, help="side of the stored PNGs, px")
    ap.add_argument("--image-size", type=int, default=112, help="model input side, px")
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

    from anomaly_core import storage
    from anomaly_core.config import ModelConfig
    from jobs.demo import make_dataset
    from jobs.fit import run_fit
    from tests.helpers import make_bucket, upload

    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    data = make_dataset(work / "parts", n_train=20, n_good=a.images // 2, n_defect=a.images - a.images // 2,
                        size=a.size, seed=0)
    server = MotoServer()
    try:
        opts = StorageOptions(endpoint_url=server.url)
        make_bucket(server.url, "archive")
        t = time.time()
        n = len(upload(data / "test", "s3://archive/parts", opts))
        print(f"uploaded {n} objects in {time.time() - t:.0f} s", flush=True)
        run_fit(str(data / "train" / "good"), str(work / "model"),
                config=ModelConfig(image_size=a.image_size), batch_size=8)
        local = one_run(str(data / "test"), str(work / "model"), str(work / "out_local"), "", a.batch_size)
        s3 = one_run("s3://archive/parts", str(work / "model"), str(work / "out_s3"), server.url, a.batch_size)
        assert storage.list_files("s3://archive/parts", opts) and local["images"] == s3["images"] == n
    finally:
        server.stop()
    print("| source | images | seconds | images/s | driver peak RSS MB |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in (("local disk", local), ("S3 (moto_server, 127.0.0.1)", s3)):
        print(f"| {name} | {r['images']} | {r['wall_seconds']} | {r['images'] / r['wall_seconds']:.1f} | "
              f"{r['driver_peak_rss_mb']} |")
    print(f"S3 / local throughput: {local['wall_seconds'] / s3['wall_seconds']:.2f}")


if __name__ == "__main__":
    main()
