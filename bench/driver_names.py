"""Driver (Ray head) peak memory of a score run's listing, resume and completeness check over an
archive of single images, listed on the driver (list_archive, as score runs did before) and in Ray
tasks (stream_archive + output.tally, as they do now).

    python bench/driver_names.py --names 1000000 --buckets 1000

A moto S3 server in a child process (tests/s3server.py serve_names) holds N 0-byte objects in
`--buckets` buckets; the archive is the brace range s3://names-{000..}/metal-plate/2026-11-21/ (moto
scans every key of a bucket for each list request, so one bucket of 10^6 keys would take hours to
page through; spread over buckets, each list request stays small and the listing still goes through
the S3 API over HTTP). Each way is measured in its own process, whose peak RSS (VmHWM) over its RSS
after Ray has started (VmRSS) is printed, in MB and bytes per name:

- driver: list_archive, then the completeness check as it was (jobs/score.py: `set(uris) -
  set(rows["uri"].to_pylist())`, the rows' uri column as an Arrow column of the same names);
- ray: stream_archive, the tally of what is pending (output.tally, pending), a commit of one row per
  pending name written by Ray tasks (uri, status, verdict: what the tally reads; no image is scored),
  and the completeness check (output.tally again, tally_counts).

What neither figure covers: decoding and scoring images (the model actors' memory, not the driver's).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEMPLATE = "metal-plate/2026-11-21/line=L3/{i:09d}.png"


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak so far) of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(way: str, uri: str, endpoint: str, names: int) -> dict:
    """Run one way in this process; its peak RSS over the RSS once Ray has started."""
    import pyarrow as pa
    import ray

    from anomaly_core import storage
    from anomaly_core.storage import StorageOptions
    from jobs import output
    from jobs.runtime import ensure_ray, list_archive, stream_archive

    options = StorageOptions(endpoint_url=endpoint).resolved()
    ensure_ray(None)
    gc.collect()
    base = memory_mb("VmRSS")
    t0 = time.time()
    if way == "driver":
        uris = list_archive(uri, options).images                   # the names, as the run listed them
        rows_uri = pa.table({"uri": uris})["uri"]                  # the run's rows, uri column, as read back
        missing = len(set(uris) - set(rows_uri.to_pylist()))       # the completeness check
        listed, duplicates = len(uris), 0
    else:
        images = stream_archive(uri, options).images
        todo = output.pending(output.tally(images, [], options).materialize()).materialize()
        with tempfile.TemporaryDirectory() as out:                 # one committed row per pending name
            todo.map_batches(lambda b: pa.table({"uri": b["path"], "status": pa.array(["ok"] * b.num_rows),
                                                 "verdict": pa.array(["normal"] * b.num_rows)}),
                             batch_format="pyarrow").write_parquet(out)
            files = storage.list_files(out, suffixes=(".parquet",))
            counts = output.tally_counts(output.tally(images, files, options).materialize())
        listed, missing, duplicates = counts["listed"], counts["missing"], counts["duplicates"]
    seconds = time.time() - t0
    peak = memory_mb("VmHWM") - base
    ray.shutdown()
    assert (listed, missing, duplicates) == (names, 0, 0), (listed, missing, duplicates)
    return {"way": way, "names": names, "seconds": round(seconds, 1), "peak_mb": round(peak, 1),
            "peak_bytes_per_name": round(peak * 2 ** 20 / names)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=1_000_000)
    ap.add_argument("--buckets", type=int, default=1000, help="buckets the names are spread over (moto)")
    ap.add_argument("--ways", default="driver,ray")
    ap.add_argument("--measure", help=argparse.SUPPRESS)          # the child process: one way
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    if a.measure:
        print(json.dumps(measure(a.measure, a.uri, a.endpoint, a.names)))
        return
    if a.names % a.buckets:
        raise SystemExit(f"--names {a.names} must be a multiple of --buckets {a.buckets}")
    digits = len(str(a.buckets - 1))
    buckets = [f"names-{b:0{digits}d}" for b in range(a.buckets)]
    uri = f"s3://names-{{{0:0{digits}d}..{a.buckets - 1:0{digits}d}}}/metal-plate/2026-11-21"
    t0 = time.time()
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys, json; from tests.s3server import serve_names; "
         "serve_names(json.loads(sys.argv[1]), int(sys.argv[2]), template=sys.argv[3])",
         json.dumps(buckets), str(a.names // a.buckets), TEMPLATE],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=Path(__file__).resolve().parents[1])
    try:
        endpoint = server.stdout.readline().strip()
        print(json.dumps({"server": endpoint, "populated_s": round(time.time() - t0, 1), "uri": uri}), flush=True)
        for way in a.ways.split(","):
            child = subprocess.run([sys.executable, __file__, "--measure", way, "--uri", uri, "--endpoint", endpoint,
                                    "--names", str(a.names)], capture_output=True, text=True,
                                   env={**os.environ, "RAY_ADDRESS": ""})
            if child.returncode:
                raise SystemExit(f"{way}: exit {child.returncode}\n{child.stderr[-3000:]}")
            print(child.stdout.strip().splitlines()[-1], flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
