"""Which transformer blocks the patch features come from, judged on the verdict: each combination of
blocks is fitted and scored with the default configuration otherwise (392 px as 2 x 2 tiles, 10%
coreset, the default image score, hold-out calibration at 5%), in-process (no Ray).

    python bench/blocks.py ../shared/data/mvtec3d_cable_gland --combos 5+7,3+5,4+6,6+8,5,7 --cache CACHE

One backbone pass per set yields the tokens of every block the combinations name (--cache keeps them per
block, float16, so a new combination of cached blocks skips the backbone). A combination's descriptor is
what the backbone gives for those blocks: each block's token L2-normalised, concatenated, normalised again
(anomaly_core.backbone.normalised_tokens). Rows: image AUROC, pixel AUROC, AUPRO, F1-max, the verdict
recall / false-alarm rate on test/ at the fit's own threshold, the recall at 1% / 5% false alarms read off
the ROC curve (test labels), the bank size and the fit's seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core import metrics  # noqa: E402
from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.features import describe_tokens  # noqa: E402
from anomaly_core.model import Model  # noqa: E402
from bench.features import cache_name, extract, list_images  # noqa: E402
from bench.verdict import verdict  # noqa: E402
from jobs.evaluate import REPORTED_RATES, load_mask  # noqa: E402


def block_tokens(paths: list[Path], blocks: list[int], cfg: ModelConfig, tag: str,
                 cache: Path | None) -> dict[int, np.ndarray]:
    """{block: [N, G*G, D] float32 unit rows} of the images, one backbone pass for the blocks not cached."""
    files = {b: cache / f"{tag}_{cache_name(dataclasses.replace(cfg, blocks=(b,)))}.npy" if cache else None
             for b in blocks}
    out = {b: np.load(f).astype(np.float32) for b, f in files.items() if f is not None and f.exists()}
    todo = [b for b in blocks if b not in out]
    if todo:
        t0 = time.perf_counter()
        tok = extract(paths, dataclasses.replace(cfg, blocks=tuple(todo)))             # [N, G*G, D*len(todo)]
        d = tok.shape[-1] // len(todo)
        for j, b in enumerate(todo):
            # a block's own slice of the jointly normalised row, normalised back to a unit row
            t = tok[..., j * d:(j + 1) * d]                                               # [N, G*G, D]
            out[b] = t / np.linalg.norm(t, axis=-1, keepdims=True)
            if files[b] is not None:
                files[b].parent.mkdir(parents=True, exist_ok=True)
                np.save(files[b], out[b].astype(np.float16))
        print(f"  {tag}: blocks {todo} of {len(paths)} images in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def combine(tokens: dict[int, np.ndarray], combo: tuple[int, ...]) -> np.ndarray:
    """The backbone's descriptor for `combo`: unit blocks concatenated, then normalised -> [N, G*G, D*k]."""
    f = np.concatenate([tokens[b] for b in combo], axis=-1)
    return f / np.linalg.norm(f, axis=-1, keepdims=True)


def combo_row(root: Path, combo: tuple[int, ...], train: dict, test: dict, train_paths: list[Path],
              labels: np.ndarray, masks: np.ndarray, cfg: ModelConfig) -> dict:
    cfg = dataclasses.replace(cfg, blocks=combo)
    f_train, fg_train = describe_tokens(combine(train, combo), config=cfg)
    f_test, fg_test = describe_tokens(combine(test, combo), config=cfg)
    t0 = time.perf_counter()
    model = Model.fit_features(f_train, config=cfg, foreground=fg_train, paths=[str(p) for p in train_paths])
    fit_s = time.perf_counter() - t0
    result = model.score_features(f_test, fg_test)                                       # grids + maps
    s = result.scores
    defect = labels & masks.reshape(len(masks), -1).any(axis=1)
    recall, far = verdict(s, labels, model.calibration.threshold)
    return {"data": root.name, "blocks": "+".join(map(str, combo)), "image_auroc": metrics.auroc(labels, s),
            "pixel_auroc": metrics.auroc(masks.ravel(), result.maps.ravel()),
            "aupro": metrics.aupro(masks[defect], result.maps[defect]), "f1_max": metrics.f1_max(labels, s),
            "recall": recall, "false_alarms": far,
            **{f"roc_recall@{r:g}": metrics.recall_at_false_alarm_rate(labels, s, r) for r in REPORTED_RATES},
            "top_fraction": model.config.top_fraction, "bank": model.bank.size, "fit_s": round(fit_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("datasets", nargs="+", type=Path)
    ap.add_argument("--combos", default="5+7,3+5,4+6,6+8,5,7", help="block combinations, 0-based, e.g. 5+7,4+6")
    ap.add_argument("--tiles", type=int, default=ModelConfig.tiles)
    ap.add_argument("--cache", type=Path, help="folder for each block's tokens of each set")
    ap.add_argument("--json", type=Path, help="also write every row, unrounded, to this file")
    a = ap.parse_args()
    combos = [tuple(int(b) for b in c.split("+")) for c in a.combos.split(",") if c]
    needed = sorted({b for c in combos for b in c})
    cfg = ModelConfig(tiles=a.tiles, calibration="holdout")
    rows = []
    print("| data set | blocks | image AUROC | pixel AUROC | AUPRO | F1-max | recall / false alarms | "
          "ROC recall 1% / 5% | bank | fit s |")
    for root in a.datasets:
        train_paths, test_paths = list_images(root / "train" / "good"), list_images(root / "test")
        train = block_tokens(train_paths, needed, cfg, f"{root.name}_train", a.cache)
        test = block_tokens(test_paths, needed, cfg, f"{root.name}_test", a.cache)
        labels = np.array([p.parent.name != "good" for p in test_paths])
        masks = np.stack([load_mask(root, p, size=cfg.input_size) for p in test_paths])   # [M, S, S]
        for combo in combos:
            r = combo_row(root, combo, train, test, train_paths, labels, masks, cfg)
            rows.append(r)
            print(f"| {r['data']} | {r['blocks']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                  f"{r['aupro']:.4f} | {r['f1_max']:.4f} | {r['recall']:.3f} / {r['false_alarms']:.3f} | "
                  + " / ".join(f"{r[f'roc_recall@{x:g}']:.3f}" for x in REPORTED_RATES)
                  + f" | {r['bank']:,} | {r['fit_s']:.0f} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
