"""A small real-image demo that needs nothing outside the installed packages.

Normal parts are crops of a real texture photograph shipped with scikit-image (brick, grass or gravel);
defective parts get a drawn scratch, a stain or a patch of a foreign texture, with a ground-truth mask.
The folder is laid out as MVTec AD, so `anomaly evaluate` works on it too.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from anomaly_core import metrics
from anomaly_core.config import ModelConfig

log = logging.getLogger(__name__)

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "stain", "foreign")


def _texture(name: str) -> np.ndarray:
    import skimage.data
    if name not in TEXTURES:
        raise ValueError(f"texture {name!r} is unknown; choose one of {list(TEXTURES)}")
    return getattr(skimage.data, name)()                                  # [512, 512] uint8


def make_part(texture: np.ndarray, rng: np.random.Generator, *, size: int) -> np.ndarray:
    """A random crop (half the photograph's side) resized to [size, size] uint8 gray."""
    side = texture.shape[0] // 2
    y, x = rng.integers(0, texture.shape[0] - side, size=2)
    return np.asarray(Image.fromarray(texture[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR))


def add_defect(part: np.ndarray, kind: str, rng: np.random.Generator, *, foreign: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Draw a defect of `kind` into a copy of part [S, S]; returns (image, mask [S, S] bool)."""
    s = part.shape[0]
    img = Image.fromarray(part.copy())
    mask = Image.new("L", (s, s), 0)
    d_img, d_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    cx, cy = rng.integers(s // 4, 3 * s // 4, size=2)
    r = int(s * rng.uniform(0.06, 0.12))
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        dx, dy = int(np.cos(angle) * 2.5 * r), int(np.sin(angle) * 2.5 * r)
        line = [(cx - dx, cy - dy), (cx + dx, cy + dy)]
        width = max(2, s // 40)
        d_img.line(line, fill=int(rng.choice([15, 240])), width=width)
        d_mask.line(line, fill=255, width=width)
    elif kind == "stain":
        box = [cx - r, cy - r, cx + r, cy + r]
        d_img.ellipse(box, fill=int(rng.integers(0, 60)))
        d_mask.ellipse(box, fill=255)
    elif kind == "foreign":
        patch = Image.fromarray(foreign[:2 * r, :2 * r])
        hole = Image.new("L", (2 * r, 2 * r), 0)
        ImageDraw.Draw(hole).ellipse([0, 0, 2 * r - 1, 2 * r - 1], fill=255)
        img.paste(patch, (cx - r, cy - r), hole)
        mask.paste(hole, (cx - r, cy - r), hole)
    else:
        raise ValueError(f"defect {kind!r} is unknown; choose one of {list(DEFECTS)}")
    return np.asarray(img), np.asarray(mask) > 0


def make_dataset(root: str | Path, *, texture: str = "brick", n_train: int = 12, n_good: int = 4,
                 n_defect: int = 6, size: int = 224, seed: int = 0) -> Path:
    """Write an MVTec-AD-layout folder of generated parts; returns its root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    tex = _texture(texture)
    foreign = _texture(next(t for t in TEXTURES if t != texture))
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(make_part(tex, rng, size=size)).save(root / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(make_part(tex, rng, size=size)).save(root / "test/good" / f"{i:03d}.png")
    for i in range(n_defect):
        img, mask = add_defect(make_part(tex, rng, size=size), DEFECTS[i % len(DEFECTS)], rng, foreign=foreign)
        Image.fromarray(img).save(root / "test/defect" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth/defect" / f"{i:03d}_mask.png")
    return root


def run_demo(out: str, **run_kw) -> dict:
    """Generate parts, fit on the good ones, score an archive that also holds a corrupt file, and show
    what an analyst would query."""
    # imported here so that generating parts needs the core library only (bench/gpu.py runs without Ray)
    from jobs.analyst import connect
    from jobs.fit import run_fit
    from jobs.score import run_score

    out_dir = Path(out)
    data = make_dataset(out_dir / "data", n_train=20, n_good=8, n_defect=12)
    (data / "test" / "defect" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    t = time.time()
    manifest = run_fit(str(data / "train" / "good"), str(out_dir / "model"), overwrite=True,
                       config=ModelConfig(), **run_kw)
    run = run_score(str(data / "test"), str(out_dir / "model"), str(out_dir / "scores"), **run_kw)
    con = connect(str(out_dir / "scores"))
    rows = con.execute("SELECT uri, score, verdict FROM scores WHERE run_id = ? AND status = 'ok' ORDER BY uri",
                       [run["run_id"]]).fetchall()
    labels = np.array(["/defect/" in r[0] for r in rows])
    top = con.execute(
        "SELECT regexp_extract(uri, '[^/]+/[^/]+$') AS image, round(score, 4) AS score, verdict, peak_x, peak_y "
        "FROM scores WHERE run_id = ? AND status = 'ok' ORDER BY score DESC LIMIT 5", [run["run_id"]]).fetchall()
    errors = con.execute("SELECT uri, error FROM scores WHERE run_id = ? AND status = 'error'",
                         [run["run_id"]]).fetchall()
    from jobs.report import write_report
    report = write_report(str(out_dir / "scores"), str(out_dir / "report.html"), top=8, title="Demo audit")
    result = {"model_id": manifest["model_id"], "threshold": manifest["calibration"]["threshold"],
              "report": str(report),
              "run": run, "image_auroc": metrics.auroc(labels, np.array([r[1] for r in rows])),
              "top_anomalies": top, "error_rows": errors, "seconds": round(time.time() - t, 1)}
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result
