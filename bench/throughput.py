"""Score throughput against the bare backbone, measured in one run on this machine.

    python bench/throughput.py [--data DIR] [--images 96] [--train 20] [--batch-size 16] [--ef-search N]
                               [--rounds 2] [--stages N]

The model is fitted (the fit job, defaults) on `--train` good images: DIR/train/good, the first N in
name order, or generated brick parts without DIR. A real fit of 200 images gives a bank of about 12.5k
vectors at the defaults, and the search cost grows with it, so the figures depend on --train; the bank
size and the index `auto` chose are printed. Three figures, same images, same batch size (1 and 2 are timed
--rounds times, alternately, and each is its fastest round: a shared machine's slow spells then land on
neither figure alone):
  1. bare backbone forward (already decoded, resized uint8 arrays; the limit),
  2. the score step in-process (decode + features + kNN + maps + peaks + stored grids;
     jobs.scorer.Scorer),
  3. the Ray score job end to end (read files -> Parquet), excluding Ray start-up but including actor start.
     The job runs twice, on the first quarter of the images and then on all of them (separate outputs), so
     that its fixed cost per run (actor start-up, listing, completeness check, publish) and its marginal
     rate, what a night of many more images approaches, are printed as well:
     marginal = (N - N/4) / (t_N - t_N/4), fixed = t_N - N / marginal.
--stages N: then the score step once more over the first N images under cProfile, and the share of its
time each stage takes (cumulative time of the functions named in STAGES; the profiler's own overhead is
in the total, so the shares are indicative). --ef-search: the fit's config value (an HNSW bank's).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from anomaly_core.config import ModelConfig
from anomaly_core.decode import decode_batch
from anomaly_core.images import IMAGE_EXTENSIONS
from jobs.demo import make_dataset
from jobs.fit import run_fit
from jobs.runtime import ensure_ray
from jobs.score import run_score
from jobs.scorer import Scorer

# Stages of the score step: (label, module path suffix, function name) of the function whose cumulative
# time is the stage's.
STAGES = [("decode + resize", "anomaly_core/decode.py", "decode_batch"),
          ("backbone forward (tiles, stitch)", "anomaly_core/features.py", "tokens"),
          ("descriptors (describe_tokens)", "anomaly_core/features.py", "describe_tokens"),
          ("bank search", "anomaly_core/index.py", "nearest"),
          ("image scores", "anomaly_core/scoring.py", "image_scores"),
          ("maps", "anomaly_core/scoring.py", "image_maps"),
          ("peaks", "anomaly_core/scoring.py", "peak_locations"),
          ("stored grids", "anomaly_core/scoring.py", "encode_grid")]


def stage_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds of each STAGES function in `profile` (0 when it was not called)."""
    out = dict.fromkeys([label for label, _, _ in STAGES], 0.0)
    for (file, _, name), (_, _, _, cumulative, _) in pstats.Stats(profile).stats.items():
        for label, suffix, fn in STAGES:
            if name == fn and file.endswith(suffix):
                out[label] += cumulative
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="MVTec-layout folder (default: generated brick parts)")
    ap.add_argument("--images", type=int, default=96, help="images to score")
    ap.add_argument("--train", type=int, default=20, help="good images the bank is fitted on")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ef-search", type=int, default=None, help="the fit's ef_search (default: the config's)")
    ap.add_argument("--rounds", type=int, default=2, help="alternate timed rounds of figures 1 and 2")
    ap.add_argument("--stages", type=int, default=0, help="images of the profiled pass (0: none)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    data = a.data or make_dataset(work / "data", n_train=a.train, n_good=a.images // 2, n_defect=a.images // 2)
    good = sorted(p for p in (data / "train" / "good").rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if len(good) < a.train:
        raise SystemExit(f"--train {a.train}: {data / 'train' / 'good'} holds {len(good)} images")
    train = work / "train"
    train.mkdir()
    for f in good[:a.train]:
        shutil.copy(f, train / f.name)
    files = sorted(p for p in (data / "test").rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    files = files[:a.images]
    quarter = max(1, len(files) // 4)
    archive, archive_q = work / "archive", work / "archive-quarter"
    archive.mkdir()
    archive_q.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, archive / f"{i:05d}{f.suffix}")
        if i < quarter:
            shutil.copy(f, archive_q / f"{i:05d}{f.suffix}")
    cfg = ModelConfig() if a.ef_search is None else ModelConfig(ef_search=a.ef_search)
    ensure_ray(None)
    manifest = run_fit(str(train), str(work / "model"), config=cfg)

    batch = decode_batch({"path": np.array([str(f) for f in files], dtype=object),
                          "bytes": np.array([f.read_bytes() for f in files], dtype=object)},
                         input_size=cfg.input_size)
    scorer = Scorer(model_path=str(work / "model"), device="cpu")
    tokens = scorer.model.backbone().tokens                  # the bare backbone forward, over every tile
    bs = a.batch_size
    raw = {"path": np.array([str(f) for f in files], dtype=object),
           "bytes": np.array([f.read_bytes() for f in files], dtype=object)}

    def forward(n: int) -> None:
        for i in range(0, n, bs):
            tokens(batch["pixels"][i:min(i + bs, n)])

    def step(n: int) -> None:
        for i in range(0, n, bs):
            scorer(decode_batch({k: v[i:min(i + bs, n)] for k, v in raw.items()}, input_size=cfg.input_size))

    forward(bs)                                                                       # warm-up
    step(bs)
    backbone_s, step_s = [], []
    for _ in range(a.rounds):
        for fn, seconds in ((forward, backbone_s), (step, step_s)):
            t = time.perf_counter()
            fn(len(files))
            seconds.append(time.perf_counter() - t)
    backbone_ips, step_ips = len(files) / min(backbone_s), len(files) / min(step_s)
    stages = None
    if a.stages:
        profile = cProfile.Profile()
        t = time.perf_counter()
        profile.runcall(step, min(a.stages, len(files)))
        stages = (stage_seconds(profile), time.perf_counter() - t)

    job_q_s = run_score(str(archive_q), str(work / "model"), str(work / "scores-quarter"), batch_size=bs)["seconds"]
    job_s = run_score(str(archive), str(work / "model"), str(work / "scores"), batch_size=bs)["seconds"]
    job_ips = len(files) / job_s
    marginal_ips = (len(files) - quarter) / max(job_s - job_q_s, 1e-9)

    print(f"images={len(files)} train={a.train} image_size={cfg.image_size} tiles={cfg.tiles} blocks={cfg.blocks} "
          f"batch={bs} bank={scorer.model.bank.size} index={manifest['stats']['index']} "
          f"search={scorer.model.bank.search_path} rounds={a.rounds}")
    print(f"| bare backbone forward | {backbone_ips:.2f} img/s | 1.00 |")
    print(f"| score step in-process | {step_ips:.2f} img/s | {step_ips / backbone_ips:.2f} |")
    print(f"| Ray score job, files -> Parquet | {job_ips:.2f} img/s | {job_ips / backbone_ips:.2f} |")
    print(f"| Ray score job, marginal ({quarter} -> {len(files)} images) | {marginal_ips:.2f} img/s "
          f"| {marginal_ips / backbone_ips:.2f} |")
    print(f"Ray job: {job_s:.1f} s for {len(files)} images, {job_q_s:.1f} s for {quarter}; fixed cost per run "
          f"{job_s - len(files) / marginal_ips:.1f} s")
    if stages:
        seconds, total = stages
        n = min(a.stages, len(files))
        print(f"\nscore step under cProfile, {n} images, {n / total:.2f} img/s")
        print("| stage | ms per image | share of the step |\n| --- | --- | --- |")
        for label, s in [*seconds.items(), ("rest (rows, verdicts, profiler)", total - sum(seconds.values()))]:
            print(f"| {label} | {1000 * s / n:.1f} | {s / total:.1%} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
