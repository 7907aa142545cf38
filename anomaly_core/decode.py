"""Bytes -> model-ready pixels, per batch: the read/decode step of every job (Ray read tasks call it).

A batch is dict[str, np.ndarray], as Ray Data's map_batches passes it. An image that cannot be read or
decoded becomes a row with an error; the job keeps it and writes it out as such.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from anomaly_core import storage
from anomaly_core.images import ImageDecodeError, content_hash, decode_resized
from anomaly_core.shards import Sample, shard_samples
from anomaly_core.storage import StorageOptions

log = logging.getLogger(__name__)


def read_batch(batch: dict[str, np.ndarray], *, input_size: int, options: StorageOptions | None = None
               ) -> dict[str, np.ndarray]:
    """{"path": [B] URI} -> decode_batch's output. A missing object becomes a row with an error; any other
    storage error (access denied, server gone once retries are spent) raises, so that the job stops
    and no transient failure is ever recorded as a verdict."""
    blobs, errors = [], []
    for uri in batch["path"]:
        try:
            blobs.append(storage.read_bytes(str(uri), options))
            errors.append("")
        except FileNotFoundError as e:
            blobs.append(b"")
            errors.append(str(e))
    return decode_batch({"path": batch["path"], "bytes": np.asarray(blobs, dtype=object),
                         "error": np.asarray(errors, dtype=object)}, input_size=input_size)


def decode_batch(batch: dict[str, np.ndarray], *, input_size: int) -> dict[str, np.ndarray]:
    """{"path": [B] str, "bytes": [B] bytes, optional "error": [B] str} -> adds pixels [B, S, S, 3] uint8,
    S = input_size (the config's, tiles included; zeros where unreadable), width/height [B] int32 of the
    original image in pixels (0 if unreadable), content_sha256 [B] str, error [B] str ("" when fine; a
    row that arrives with an error keeps it). Drops "bytes"."""
    n = len(batch["path"])
    pixels = np.zeros((n, input_size, input_size, 3), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    digest, error = [], []
    prior = batch.get("error", np.full(n, "", dtype=object))
    for i, data in enumerate(batch["bytes"]):
        data = bytes(data) if data is not None else b""
        digest.append(content_hash(data))
        if prior[i]:
            error.append(str(prior[i]))
            continue
        try:
            # a large JPEG is decoded reduced, never below input_size; width/height stay the original's
            pixels[i], width[i], height[i] = decode_resized(data, size=input_size)
        except ImageDecodeError as e:
            error.append(str(e))
            log.warning("%s: %s", batch["path"][i], e)
            continue
        error.append("")
    out = {k: v for k, v in batch.items() if k != "bytes"}
    out.update(pixels=pixels, width=width, height=height,
               content_sha256=np.asarray(digest, dtype=object), error=np.asarray(error, dtype=object))
    return out


SHARD_ROWS = "shard_rows"      # column of read_shards' batches: how many rows the row's whole shard yields


def fetch_shard(shard: str, options: StorageOptions | None = None, *, image_column: str = "image",
                id_column: str | None = None) -> list[Sample]:
    """Every sample of one shard (anomaly_core.shards), fetched whole in one request. A missing shard is
    one error sample naming it, as a missing image is one error row; any other storage error raises."""
    try:
        data = storage.read_bytes(shard, options)
    except FileNotFoundError as e:
        return [(shard, b"", str(e))]
    return list(shard_samples(shard, data, image_column=image_column, id_column=id_column))


def shard_uris(shard: str, options: StorageOptions | None = None, image_column: str = "image",
               id_column: str | None = None) -> list[str]:
    """The URIs of the rows `shard` yields, in order (fetch_shard's; bytes are dropped at once)."""
    return [uri for uri, _, _ in fetch_shard(shard, options, image_column=image_column, id_column=id_column)]


def read_shards(batch: dict[str, np.ndarray], *, input_size: int, batch_rows: int,
                options: StorageOptions | None = None, image_column: str = "image",
                id_column: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """{"shard": [B] URI} -> decode_batch's output for every image of those shards, `batch_rows` rows at a
    time, plus SHARD_ROWS [n] int64: the number of rows the row's shard yields (the output sink commits a
    shard once it holds that many of its rows). A generator, so that a shard's pixels never sit in
    memory all at once."""
    for shard in batch["shard"]:
        samples = fetch_shard(str(shard), options, image_column=image_column, id_column=id_column)
        for s in range(0, len(samples), batch_rows):
            uris, blobs, errors = zip(*samples[s:s + batch_rows], strict=True)
            out = decode_batch({"path": np.asarray(uris, dtype=object), "bytes": np.asarray(blobs, dtype=object),
                                "error": np.asarray(errors, dtype=object)}, input_size=input_size)
            out[SHARD_ROWS] = np.full(len(uris), len(samples), dtype=np.int64)
            yield out
        del samples
