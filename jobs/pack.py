"""`anomaly pack`: a folder (or prefix, or manifest) of images -> tar shards in the WebDataset convention.

    anomaly pack s3://archive/line-3/2026-11-30/ s3://shards/line-3/2026-11-30/ --shard-size 1000

writes OUT/shard-000000.tar, OUT/shard-000001.tar, ... each holding up to `shard_size` images under their
path relative to the input (so `product=`/`line=` folders stay readable in the member names), in sorted
order, and prints the brace range that names them all, which `anomaly fit` and `anomaly score` take.
"""

from __future__ import annotations

import concurrent.futures
import logging

from anomaly_core import storage
from anomaly_core.shards import pack_tar, sample_key
from anomaly_core.storage import StorageOptions
from jobs.runtime import list_inputs

log = logging.getLogger(__name__)

SHARD_DIGITS = 6


def member_names(uris: list[str], root: str) -> list[str]:
    """Each URI's path below `root` when all lie below it (a folder or prefix that was listed), else
    below the deepest folder that holds them all (a manifest): "a/b/1.png", "a/c/2.png" -> "b/1.png",
    "c/2.png"."""
    if not all(u.startswith(root + "/") for u in uris):
        lo, hi = min(uris), max(uris)
        n = 0
        while n < min(len(lo), len(hi)) and lo[n] == hi[n]:
            n += 1
        root = lo[:min(n, len(lo) - 1)].rsplit("/", 1)[0]
    return [u[len(root) + 1:] for u in uris]


def check_sample_keys(names: list[str]) -> None:
    """Raise ValueError when two images would be one WebDataset sample (the same path up to the first
    dot of the base name, anomaly_core.shards.sample_key): a reader would take only one of them."""
    first: dict[str, str] = {}
    for name in names:
        key = sample_key(name)[0]
        if key in first:
            raise ValueError(f"{first[key]!r} and {name!r} would be one sample in a tar shard (WebDataset key "
                             f"{key!r}: the path up to the first dot of the file name), and only one of them "
                             f"read; rename one (e.g. replace dots before the extension with '_')")
        first[key] = name


def shard_uri(out: str, index: int) -> str:
    return storage.join(out, f"shard-{index:0{SHARD_DIGITS}d}.tar")


def run_pack(images: str, out: str, *, shard_size: int = 1000, workers: int = 8,
             options: StorageOptions | None = None) -> dict:
    """Pack the images named by `images` (jobs.runtime.list_inputs) into tar shards of `shard_size`
    images under `out`; `workers` shards are built at once (each fetches its images and writes one
    object). An image that disappeared since the listing is left out, with a warning; any other storage
    error stops the command. Refuses an `out` that holds shards already, and images that would share a
    WebDataset sample (check_sample_keys). Returns {"shards": brace range
    of the written shards, "count": shards written, "images": images packed, "missing": images left out}."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1 (images per tar shard, e.g. 1000)")
    options = (options or StorageOptions()).resolved()
    out = storage.normalise(out)
    storage.check_bucket(out, options)
    uris = list_inputs(images, options)
    if existing := storage.list_files(out, options, suffixes=(".tar",)):
        raise FileExistsError(f"{out} holds shards already (e.g. {existing[0]}); pack into an empty folder or prefix")
    names = member_names(uris, storage.normalise(images))
    check_sample_keys(names)
    chunks = [list(zip(uris[s:s + shard_size], names[s:s + shard_size], strict=True))
              for s in range(0, len(uris), shard_size)]

    def write(index: int) -> int:
        members = []
        for uri, name in chunks[index]:
            try:
                members.append((name, storage.read_bytes(uri, options)))
            except FileNotFoundError:
                log.warning("pack: %s disappeared since the listing; left out", uri)
        storage.write_bytes(shard_uri(out, index), pack_tar(members), options)
        return len(members)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        packed = sum(pool.map(write, range(len(chunks))))
    last = f"{len(chunks) - 1:0{SHARD_DIGITS}d}"
    brace = shard_uri(out, 0) if len(chunks) == 1 else storage.join(out, f"shard-{{{'0' * SHARD_DIGITS}..{last}}}.tar")
    log.info("pack: %d images in %d shards -> %s", packed, len(chunks), brace)
    return {"shards": brace, "count": len(chunks), "images": packed, "missing": len(uris) - packed}
