"""Driver (Ray head) memory per image name in a score run over an archive of single images.

    python bench/driver_names.py --names 1000000

The driver holds every name of the archive: `list_inputs` reads them (the real function, here from a
manifest file of generated paths as long as a nightly archive's URIs: local paths, since listing s3://
names checks their bucket), and at the end of the run the
completeness check compares them with the uri column of the run's rows (jobs/score.py: `set(uris) -
set(rows["uri"].to_pylist())`, rows read as an Arrow table). This measures the process's peak RSS over
its RSS before the names exist, for the list, then for the check's peak, in bytes per name. A run over
an archive of shards holds shard names instead (one per shard), so divide N by the images per shard.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import pyarrow as pa

from jobs.runtime import list_inputs


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak so far) of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "night.txt"
        with manifest.open("w") as f:                              # line by line: no list of names yet
            for i in range(args.names):                            # a camera archive's night
                f.write(f"/mnt/archive/metal-plate/2026-11-21/line=L{i % 8}/cam-{i % 4}/{i:09d}.png\n")
        gc.collect()
        base = memory_mb("VmRSS")
        uris = list_inputs(str(manifest))                          # the names, as the run lists them
        listed = memory_mb("VmRSS") - base
        rows_uri = pa.table({"uri": uris})["uri"]                  # the run's rows, uri column, as read back
        missing = set(uris) - set(rows_uri.to_pylist())            # the completeness check
        peak = memory_mb("VmHWM") - base
        assert not missing and len(uris) == args.names
    mean_len = sum(map(len, uris)) / len(uris)
    print(json.dumps({"names": args.names, "mean_uri_chars": round(mean_len, 1),
                      "listed_mb": round(listed, 1), "listed_bytes_per_name": round(listed * 2 ** 20 / args.names),
                      "check_peak_mb": round(peak, 1),
                      "check_peak_bytes_per_name": round(peak * 2 ** 20 / args.names)}))


if __name__ == "__main__":
    main()
