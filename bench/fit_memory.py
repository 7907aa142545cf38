"""A fit whose patch features exceed its memory budget: peak memory measured while it runs.

    python bench/fit_memory.py [--images 1200] [--image-size 224] [--budget-mb 256]

Writes N generated good parts (crops of real texture photographs) to disk, then runs `run_fit` in a fresh
process with Ray started in it under `memory_budget_mb` (the object store). A sampler thread reads /proc
every 0.2 s: the driver's RSS, and the proportional set size (PSS: shared pages split between the
processes mapping them, so the object store's shared memory counts once) of the driver plus every Ray
process it started. Prints the training features' total size against the budget, both peaks, what Ray
spilled to disk, and the fitted model's cover radius and bank size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ONE_FIT = r"""
import json, os, re, sys, threading, time
from anomaly_core.config import ModelConfig
from jobs.fit import run_fit

def descendants(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out

def field(pid, path, key):
    try:
        for line in open(f"/proc/{pid}/{path}"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024          # kB -> MB
    except OSError:
        pass
    return 0.0

peak = {"driver_rss_mb": 0.0, "total_pss_mb": 0.0}
done = threading.Event()
def sample():
    me = os.getpid()
    while not done.is_set():
        peak["driver_rss_mb"] = max(peak["driver_rss_mb"], field(me, "status", "VmRSS"))
        peak["total_pss_mb"] = max(peak["total_pss_mb"], sum(field(p, "smaps_rollup", "Pss:") for p in descendants(me)))
        done.wait(0.2)
threading.Thread(target=sample, daemon=True).start()
data, model, size, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.time()
m = run_fit(data, model, config=ModelConfig(image_size=size), batch_size=16, memory_budget_mb=budget)
wall = time.time() - t0
import ray
# the raylet logs its cumulative spilling; its last such line is the run's total
log = open(os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "raylet.out")).read()
spills = re.findall(r"Spilled (\d+) MiB, (\d+) objects", log)
spilled = spills[-1] if spills else None
done.set()
print("RESULT " + json.dumps({**peak, "wall_s": round(wall, 1), "stats": m["stats"],
                              "spilled_mb": int(spilled[0]) if spilled else 0,
                              "spilled_objects": int(spilled[1]) if spilled else 0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--image-size", type=int, default=224, help="model input side, px")
    ap.add_argument("--budget-mb", type=int, default=256, help="memory_budget_mb of the fit")
    a = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from anomaly_core.config import ModelConfig
    from jobs.demo import make_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-fit-memory-"))
    data = make_dataset(work / "parts", n_train=a.images, n_good=1, n_defect=1, size=a.image_size, seed=0)
    cfg = ModelConfig(image_size=a.image_size)
    feature_mb = a.images * cfg.grid_size ** 2 * cfg.feature_dim * 4 / 2 ** 20
    p = subprocess.run([sys.executable, "-c", ONE_FIT, str(data / "train" / "good"), str(work / "model"),
                        str(a.image_size), str(a.budget_mb)], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(root)})
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"fit failed:\n{p.stderr[-4000:]}")
    r = json.loads(lines[0][len("RESULT "):])
    s = r["stats"]
    print("| images | patch features MB | budget MB | fit s | driver peak RSS MB | driver + Ray peak PSS MB "
          "| spilled MB (objects) | bank | cover radius |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {a.images} | {feature_mb:.0f} | {a.budget_mb} | {r['wall_s']} | {r['driver_rss_mb']:.0f} | "
          f"{r['total_pss_mb']:.0f} | {r['spilled_mb']} ({r['spilled_objects']}) | {s['bank_size']} | "
          f"{s['cover_radius']:.4f} |")


if __name__ == "__main__":
    main()
