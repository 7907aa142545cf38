"""Scoring from a local S3 server against scoring from local disk, and single objects against tar
shards: same images, same model, one run each.

    python bench/storage.py [--images 5000] [--size 64] [--image-size 112] [--shards 10] [--small-model]

Starts moto_server on 127.0.0.1 (as the tests do) behind a relay that counts the HTTP requests reaching
it (tests/s3server.py), writes N small PNG parts (crops of real texture photographs, with drawn defects
in half of them) to disk and to a bucket, packs the bucket's copy into --shards tar shards (`anomaly
pack`), fits one model, then runs `anomaly score` once on each archive (local disk, S3 objects, S3
shards), each in a fresh process, and prints images/s, the S3 requests of the run, and the driver's
peak RSS (the process that lists the archive and gathers the summary). --small-model: a 56 px, 6-block
model, so that reading rather than the backbone decides the throughput on a small CPU machine.
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
from tests.s3server import MotoServer, Relay  # noqa: E402

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
    ap.add_argument("--shards", type=int, default=10, help="tar shards the S3 copy is packed into (0: none)")
    ap.add_argument("--small-model", action="store_true", help="56 px input, one block of 6 (tiles 1)")
    a = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

    from anomaly_core import storage
    from anomaly_core.config import ModelConfig
    from jobs.demo import make_dataset
    from jobs.fit import run_fit
    from jobs.pack import run_pack
    from tests.helpers import make_bucket, upload

    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    data = make_dataset(work / "parts", n_train=20, n_good=a.images // 2, n_defect=a.images - a.images // 2,
                        size=a.size, seed=0)
    server = MotoServer()
    relay = Relay(server.port)
    try:
        opts = StorageOptions(endpoint_url=server.url)
        make_bucket(server.url, "archive")
        t = time.time()
        n = len(upload(data / "test", "s3://archive/parts", opts))
        print(f"uploaded {n} objects in {time.time() - t:.0f} s", flush=True)
        if a.shards:
            packed = run_pack("s3://archive/parts", "s3://archive/shards", shard_size=-(-n // a.shards), options=opts)
            print(f"packed into {packed['count']} shards: {packed['shards']}", flush=True)
        config = (ModelConfig(image_size=56, tiles=1, blocks=(6,)) if a.small_model
                  else ModelConfig(image_size=a.image_size))
        run_fit(str(data / "train" / "good"), str(work / "model"), config=config, batch_size=8)
        runs = [("local disk", one_run(str(data / "test"), str(work / "model"), str(work / "out_local"), "",
                                       a.batch_size), None)]
        archives = [("S3 (`moto_server`, 127.0.0.1), single objects", "s3://archive/parts")]
        if a.shards:
            archives.append((f"S3 (`moto_server`, 127.0.0.1), {packed['count']} tar shards", packed["shards"]))
        for i, (name, uri) in enumerate(archives):
            before = relay.requests
            result = one_run(uri, str(work / "model"), str(work / f"out_s3_{i}"), relay.url, a.batch_size)
            runs.append((name, result, relay.requests - before))
        assert storage.list_files("s3://archive/parts", opts) and all(r["images"] == n for _, r, _ in runs)
    finally:
        relay.cut()
        server.stop()
    print("| source | images | seconds | images/s | S3 requests | driver peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r, requests in runs:
        print(f"| {name} | {r['images']} | {r['wall_seconds']} | {r['images'] / r['wall_seconds']:.1f} | "
              f"{'' if requests is None else f'{requests:,}'} | {r['driver_peak_rss_mb']} |")
    for name, r, _ in runs[1:]:
        print(f"{name} / local throughput: {runs[0][1]['wall_seconds'] / r['wall_seconds']:.2f}")


if __name__ == "__main__":
    main()
