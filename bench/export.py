"""The exported ONNX graph against the PyTorch path: file size, latency per image, differences.

    python bench/export.py DATASET [--n-train 16] [--threads 2]

DATASET is an MVTec-layout folder. For each input size (224 px: one tile; 392 px: 2 x 2 tiles, the
default) a model with the default config otherwise is fitted in-process on the first --n-train images of
DATASET/train/good, saved, and exported as fp32 and fp16 graphs (anomaly_core.export). Every test image
(DATASET/test/*/*, decoded and resized as the score job does) is then scored one at a time, in the same
run, by Model.score (maps included; FAISS search) and by onnxruntime's CPU provider, in turn, both
on --threads threads. Latency is the median over the images of one call (batch of 1, after one warm-up
call each). Differences are the largest absolute ones over the test images against Model.score, and
"verdicts" counts images whose verdict differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.export import INPUT_NAME, export_model  # noqa: E402
from anomaly_core.images import decode_resized  # noqa: E402
from anomaly_core.model import Model  # noqa: E402
from jobs.runtime import list_inputs  # noqa: E402


def load(paths: list[str], size: int) -> np.ndarray:
    """[N, size, size, 3] uint8, as the score job reads them (anomaly_core.images.decode_resized)."""
    return np.stack([decode_resized(Path(p).read_bytes(), size=size)[0] for p in paths])


def paired_ms(fns, images: np.ndarray) -> list[float]:
    """Median milliseconds of each fn(one image [1, S, S, 3]) over the images, the fns called in turn on
    each image (so a change in the machine's load hits both), after one warm-up call each."""
    for fn in fns:
        fn(images[:1])
    times = np.zeros((len(images), len(fns)))
    for i in range(len(images)):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn(images[i:i + 1])
            times[i, j] = time.perf_counter() - t0
    return [1000 * float(m) for m in np.median(times, axis=0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--n-train", type=int, default=16, help="Good images the models are fitted on.")
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2], help="Tiles per side (1: 224 px, 2: 392 px).")
    ap.add_argument("--threads", type=int, default=2, help="Threads of torch and of onnxruntime.")
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    torch.set_num_threads(a.threads)
    train = list_inputs(str(Path(a.dataset) / "train" / "good"))[:a.n_train]
    test = list_inputs(str(Path(a.dataset) / "test"))
    print(f"{a.dataset}: fit on {len(train)} images, {len(test)} test images, {a.threads} threads, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print("| input px | tiles | grid | bank | dtype | file MB | torch ms/img | onnxruntime ms/img | torch / ort "
          "| max abs d score | max abs d grid | max abs d map | verdicts differing |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for t in a.tiles:
            cfg = ModelConfig(tiles=t)
            model = Model.fit(load(train, cfg.input_size), config=cfg, device="cpu",
                              names=[Path(p).name for p in train])
            model.save(f"{tmp}/m{t}")
            images = load(test, cfg.input_size)
            ref = model.score(images)
            for dtype in ("fp32", "fp16"):
                result = export_model(model, f"{tmp}/m{t}-{dtype}.onnx", dtype=dtype)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = a.threads, 1
                sess = ort.InferenceSession(result.path, opts, providers=["CPUExecutionProvider"])
                score, grid, amap = sess.run(None, {INPUT_NAME: images})
                ms_torch, ms_ort = paired_ms([model.score, lambda x, s=sess: s.run(None, {INPUT_NAME: x})], images)
                flips = int((model.is_anomalous(score) != model.is_anomalous(ref.scores)).sum())
                print(f"| {cfg.input_size} | {t} | {cfg.grid_size} | {model.bank.size} | {dtype} | "
                      f"{result.bytes / 1e6:.1f} | {ms_torch:.0f} | {ms_ort:.0f} | {ms_torch / ms_ort:.2f} | "
                      f"{np.abs(score - ref.scores).max():.2e} | {np.abs(grid - ref.distances).max():.2e} | "
                      f"{np.abs(amap - ref.maps).max():.2e} | {flips} of {len(images)} |", flush=True)


if __name__ == "__main__":
    main()
