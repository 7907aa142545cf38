"""Ray start-up and the Ray Data steps both jobs share."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

from anomaly_core import storage
from anomaly_core.decode import read_batch, read_shards
from anomaly_core.images import IMAGE_EXTENSIONS
from anomaly_core.shards import (
    IMAGE_SUFFIXES,
    PARQUET,
    SHARD_SUFFIXES,
    check_parquet_schema,
    expand_braces,
    is_shard,
)
from anomaly_core.storage import StorageOptions
from jobs.console import Progress

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, object_store_mb: int | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); without one, start Ray in this process, with an
    object store of `object_store_mb` (None: Ray's default, 30% of RAM; objects beyond it spill to disk).
    A cluster's object store is its own configuration: `object_store_mb` applies only to a local start.

    Ray's own logging is left as it is configured (jobs/console.py sends it to a log file at the CLI);
    Ray Data's progress bars are off: Progress shows one line per job, in images."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        log.info("starting Ray in-process (no --address / RAY_ADDRESS)")
        store = None if object_store_mb is None else object_store_mb * 2 ** 20
        # "local": always a new instance, never a cluster some earlier `ray start` left on this machine
        ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False,
                 object_store_memory=store)
    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True          # a StorageError from a task reaches the CLI as itself
    # Ray Data's bars count blocks per operator (0.00/1.00 for a whole run), and its hint about a newer UI
    # comes with them; Progress replaces both
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False             # the execution plan and dataset id: in its log file


def check_paths_reach_every_node(paths: dict[str, list[str]], *, nodes: list[dict] | None = None) -> None:
    """Refuse local paths on a cluster of more than one node: a local path names a different disk on each
    node, so an archive on the driver's disk alone would become a `not found` error row for every image
    read elsewhere, in an audit marked complete. paths: role (archive, model, output) -> URIs; nodes:
    the cluster's nodes as ray.nodes() reports them (None: ask Ray). Callers skip this check where the
    user declared a shared file system."""
    alive = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    local = {role: [u for u in uris if not storage.is_s3(u)] for role, uris in paths.items()}
    local = {role: uris for role, uris in local.items() if uris}
    if len(alive) > 1 and local:
        named = "; ".join(f"{role} {uris[0]}" + (f" and {len(uris) - 1} more" if len(uris) > 1 else "")
                          for role, uris in local.items())
        raise ValueError(f"the Ray cluster has {len(alive)} nodes and these paths are local ({named}): each node "
                         f"would read or write its own disk. Use s3:// URIs, or pass --shared-fs to `anomaly fit` / "
                         f"`anomaly score` (shared_fs: true in the audit file's ray section) if every node mounts "
                         f"that file system at the same path; `anomaly evaluate` and `anomaly demo` work on local "
                         f"folders and need a single-node Ray")


def resources() -> tuple[int, int]:
    """(CPUs, GPUs) the cluster reports."""
    r = ray.cluster_resources()
    return int(r.get("CPU", 1)), int(r.get("GPU", 0))


def default_actors(requested: int | None) -> tuple[int, int, float]:
    """(actor count, torch threads per actor, GPUs per actor) from what the cluster has.

    GPUs: one actor per GPU. CPUs: actors of 4 threads (ViT matmuls scale well to ~4 cores), at least one;
    each actor reserves a single logical CPU so decoding tasks still get scheduled beside it.
    """
    cpus, gpus = resources()
    if gpus:
        return requested or gpus, max(1, cpus // max(gpus, 1)), 1.0
    n = requested or max(1, cpus // 4)
    return n, max(1, cpus // n), 0.0


def model_stage(actors: int) -> ray.data.ActorPoolStrategy:
    """`compute=` of the model stage's map_batches: a fixed pool of `actors` actors."""
    return ray.data.ActorPoolStrategy(size=actors)


class _Track(ExecutionCallback):
    """Feeds the Progress line of one dataset (a subclass per dataset names it by `key`). Ray Data builds
    execution callbacks from its DataContext with no arguments, and ships the context to its workers, so
    the class holds a key and the Progress stays here, on the driver."""
    key = ""

    def before_execution_starts(self, executor):
        self.line = _LINES.pop(self.key, None)       # only the first execution counts (see track)

    def on_execution_step(self, executor):
        if self.line is not None:
            self.line.update(_rows_out(executor))

    def after_execution_succeeds(self, executor):
        if self.line is not None:
            self.line.update(_rows_out(executor))
            self.line.close()

    def after_execution_fails(self, executor, error):
        if self.line is not None:
            self.line.close()


_LINES: dict[str, Progress] = {}


def _rows_out(executor) -> int:
    # executor._topology: the operators being run (Ray Data's internals, pinned with ray==2.60.0)
    return sum(op.metrics.rows_task_outputs_generated for op in executor._topology
               if isinstance(op, ActorPoolMapOperator))


def track(ds: ray.data.Dataset, *, total: int, label: str) -> ray.data.Dataset:
    """`ds`, whose execution shows one Progress line: rows out of its actor pool (the model stage), of
    `total`. Only the first execution counts: a write runs the plan, then reads its result once more."""
    key = f"{label}-{len(_LINES)}-{time.monotonic_ns()}"
    _LINES[key] = Progress(total=total, label=label)
    ctx = ds.context
    ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes,
                                             type("_Track", (_Track,), {"key": key})]
    return ds


def ray_map(fn, parts, *shared) -> list:
    """[fn(part, *shared) for part in parts] as Ray tasks (one CPU each), results in order: the `map_fn`
    of the coreset and calibration passes. `parts` may be ObjectRefs (blocks in the object store), which
    each task reads where it runs; `shared` is put in the object store once for all tasks."""
    remote = ray.remote(num_cpus=1)(_call)
    fn_ref = ray.put(fn)
    shared_refs = [ray.put(s) for s in shared]
    return ray.get([remote.remote(fn_ref, part, *shared_refs) for part in parts])


def _call(fn, part, *shared):
    return fn(part, *shared)


MANIFEST_SUFFIXES = (".txt", ".lst")


@dataclasses.dataclass(frozen=True)
class Archive:
    """What an archive URI names: single image objects or shards (anomaly_core.shards), never both.
    images, shards: sorted, de-duplicated, normalised URIs."""
    images: list[str]
    shards: list[str]


@dataclasses.dataclass(frozen=True)
class Source:
    """One part of an archive as given: `kind` "name" (one image or shard URI, listed as it is),
    "manifest" (a file of URIs) or "prefix" (a folder or s3:// prefix, listed recursively)."""
    kind: str
    uri: str


def archive_sources(uri: str | list[str], options: StorageOptions | None = None) -> list[Source]:
    """The sources `uri` (one or a list of) names, without listing any of them:

    - a folder or s3:// prefix, listed recursively: its images, or its shards (*.tar, *.parquet);
    - a manifest file (.txt/.lst: one URI per line, `#` comments; relative entries are relative to the
      manifest's folder) of image or shard URIs, for archives whose listing is itself expensive;
    - one image or shard URI, or a brace range of them (`shard-{000000..000999}.tar`);
    - a brace range of folders or prefixes (`line-{1..3}/`): each listed as a folder is.

    Each bucket is checked once here (a wrong bucket fails before any work, not as an error row per
    image)."""
    sources: list[Source] = []
    checked: set[str] = set()                         # buckets: one request each, not one per name
    for given in [uri] if isinstance(uri, str) else uri:
        expanded = expand_braces(given)
        for u in map(storage.normalise, expanded):
            if (bucket := bucket_of(u)) not in checked:
                storage.check_bucket(u, options)
                checked.add(bucket)
            if u.lower().endswith(MANIFEST_SUFFIXES):
                sources.append(Source("manifest", u))
            elif expanded != [given] and u.lower().endswith(IMAGE_SUFFIXES + SHARD_SUFFIXES):
                sources.append(Source("name", u))     # named one by one: a missing one is an error row
            elif is_shard(u) and storage.is_file(u, options):
                sources.append(Source("name", u))
            else:                                     # a folder or prefix (a brace range of them too)
                sources.append(Source("prefix", u))
    return sources


def source_names(source: Source, options: StorageOptions | None = None) -> list[str]:
    """The normalised image and shard URIs of one source (archive_sources); a folder or prefix that
    does not exist fails (one that holds no image is just empty)."""
    if source.kind == "name":
        return [source.uri]
    if source.kind == "manifest":
        return sorted(read_manifest_file(source.uri, options))
    assert source.kind == "prefix", source
    listed = storage.list_files(source.uri, options, suffixes=IMAGE_SUFFIXES + SHARD_SUFFIXES, skip_hidden=False)
    if not listed and not storage.exists(source.uri, options):
        raise FileNotFoundError(f"{source.uri} not found: give a folder, an s3://bucket/prefix, a manifest "
                                f"file ({', '.join(MANIFEST_SUFFIXES)}) listing image or shard URIs, "
                                f"or shard URIs (a brace range: shard-{{000000..000099}}.tar)")
    return listed


def check_archive(uri: str | list[str], *, images: int, shards: int, image: str | None, shard: str | None,
                  shard_with_hash: str | None) -> None:
    """Refuse an archive of `images` image names and `shards` shard names that mixes both, is empty, or
    has a shard name with '#'; image, shard: an example of each (the first in sort order)."""
    if shards and images:
        raise ValueError(f"{uri!r} names both images ({images}, e.g. {image}) and shards ({shards}, "
                         f"e.g. {shard}); audit them separately, or pack the images into shards "
                         f"(`anomaly pack`)")
    if shard_with_hash is not None:
        raise ValueError(f"shard URI {shard_with_hash!r} contains '#', which separates a shard from its members in "
                         f"image URIs; rename it")
    if not images and not shards:
        raise FileNotFoundError(f"no images or shards in {uri!r} (extensions: {', '.join(IMAGE_EXTENSIONS)}; "
                                f"shards: {', '.join(SHARD_SUFFIXES)})")


def list_archive(uri: str | list[str], options: StorageOptions | None = None) -> Archive:
    """The images or shards named by `uri` (archive_sources), listed here, on the driver: every name
    is held at once (stream_archive lists in Ray tasks instead). A listed name that does not exist
    becomes an error row when read (as a missing image in a manifest does); a folder, prefix or single
    URI that does not exist fails here, as does an empty archive (a nightly job started before the
    upload finished must fail, not record an empty audit). Only names travel to the driver, never
    image bytes."""
    found: set[str] = set()
    for source in archive_sources(uri, options):
        found.update(source_names(source, options))
    shards = sorted(u for u in found if is_shard(u))
    images = sorted(u for u in found if not is_shard(u))
    check_archive(uri, images=len(images), shards=len(shards), image=images[0] if images else None,
                  shard=shards[0] if shards else None, shard_with_hash=next((s for s in shards if "#" in s), None))
    return Archive(images=images, shards=shards)


# names per block of a streamed listing: ~6 MB of Arrow strings, and 10^8 names are ~1,500 blocks
LISTING_BLOCK_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class StreamedArchive:
    """An archive listed by Ray tasks (stream_archive). images: a materialized Ray Dataset of one
    column, `path`, the image names (a name repeats where sources overlap; output.tally counts it
    once); None for an archive of shards. shards: sorted, de-duplicated (an archive of shards is
    resumed by shard, so its names are held here). local: a name of the archive that is a local path
    (the first in sort order), or None."""
    images: ray.data.Dataset | None
    shards: list[str]
    local: str | None


def stream_archive(uri: str | list[str], options: StorageOptions | None = None) -> StreamedArchive:
    """What list_archive finds, with the same checks and errors, listed in Ray tasks: one task call
    per source (archive_sources), whose names go into the object store in blocks of LISTING_BLOCK_ROWS.
    The driver holds the sources and one row of counts per block (name_kinds), never the names of an
    archive of images; a worker listing a prefix holds that prefix's names while it lists (so an
    archive laid out in several prefixes, e.g. by date or line, is also listed in parallel). Ray
    must be started (ensure_ray)."""
    sources = archive_sources(uri, options)
    names = ray.data.from_items([dataclasses.asdict(s) for s in sources]).map_batches(
        _list_sources, fn_kwargs={"options": options}, batch_size=1, batch_format="pyarrow", num_cpus=0.5)
    try:
        names = names.materialize()
    except ray.exceptions.RayTaskError as e:          # the listing's own error (a missing prefix, storage)
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise
    kinds = names.map_batches(name_kinds, batch_size=None, batch_format="pyarrow").take_all()
    first = lambda key: min((k[key] for k in kinds if k[key] is not None), default=None)   # noqa: E731
    n_images, n_shards = sum(k["images"] for k in kinds), sum(k["shards"] for k in kinds)
    check_archive(uri, images=n_images, shards=n_shards, image=first("image"), shard=first("shard"),
                  shard_with_hash=first("shard_with_hash"))
    if n_shards:
        return StreamedArchive(images=None, shards=sorted({r["path"] for r in names.take_all()}),
                               local=first("local"))
    return StreamedArchive(images=names, shards=[], local=first("local"))


def _list_sources(batch: pa.Table, *, options: StorageOptions | None):
    """Blocks of the names of the sources in `batch` (columns kind, uri): one Ray task's listing."""
    for kind, uri in zip(batch["kind"].to_pylist(), batch["uri"].to_pylist(), strict=True):
        names = source_names(Source(kind, uri), options)
        for s in range(0, len(names), LISTING_BLOCK_ROWS):
            yield pa.table({"path": pa.array(names[s:s + LISTING_BLOCK_ROWS], pa.string())})


def name_kinds(block: pa.Table) -> pa.Table:
    """One row describing a block of names (column `path`): how many are images and shards, and the
    first (in sort order) image, shard, shard with '#' in its name, and local path, or null."""
    names = block["path"].to_pylist()
    shards = [n for n in names if is_shard(n)]
    images = [n for n in names if not is_shard(n)]
    first = lambda xs: pa.array([min(xs, default=None)], pa.string())    # noqa: E731
    return pa.table({"images": [len(images)], "shards": [len(shards)], "image": first(images),
                     "shard": first(shards), "shard_with_hash": first([s for s in shards if "#" in s]),
                     "local": first([n for n in names if not storage.is_s3(n)])})


def read_manifest_file(uri: str, options: StorageOptions | None = None) -> set[str]:
    """The normalised URIs a manifest file lists (brace ranges expanded); checks the buckets they name
    (a wrong bucket is no per-image error)."""
    base = uri.rsplit("/", 1)[0]
    out: set[str] = set()
    for line in storage.read_bytes(uri, options).decode("utf-8-sig").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            absolute = "://" in line or line.startswith("/")
            out.update(map(storage.normalise, expand_braces(line if absolute else storage.join(base, line))))
    for bucket in {bucket_of(x) for x in out if storage.is_s3(x)}:
        storage.check_bucket(bucket, options)
    return out


def bucket_of(uri: str) -> str:
    """`s3://bucket` of an s3:// URI; "" for a local path (there is no bucket to check)."""
    return "s3://" + uri.split("/", 3)[2] if storage.is_s3(uri) else ""


def list_inputs(uri: str | list[str], options: StorageOptions | None = None) -> list[str]:
    """The image URIs named by `uri` (list_archive); an archive of shards is refused."""
    archive = list_archive(uri, options)
    if archive.shards:
        raise ValueError(f"{uri!r} holds shards ({archive.shards[0]}, ...); this command reads image files")
    return archive.images


def read_decoded(uris: list[str] | ray.data.Dataset, *, input_size: int, batch_size: int,
                 options: StorageOptions | None = None, block_rows: int = 64) -> ray.data.Dataset:
    """Ray Data dataset of decoded images (anomaly_core.decode.read_batch) for `uris`: a list, or a
    dataset of one column, `path` (stream_archive, output.pending). Objects are fetched and decoded in
    parallel CPU tasks, never on the driver and never on a GPU actor.
    block_rows: URIs per block (one read task); 64 amortises a task and still spreads over workers."""
    if isinstance(uris, ray.data.Dataset):
        ds = uris.repartition(target_num_rows_per_block=block_rows)
    else:
        ds = ray.data.from_arrow([pa.table({"path": uris[s:s + block_rows]}) for s in range(0, len(uris), block_rows)])
    # half a CPU per read task: its resources then differ from the model actors', so Ray Data does not
    # fuse reading into the actor (the actor would wait on I/O and decoding between forwards)
    return ds.map_batches(read_batch, fn_kwargs={"input_size": input_size, "options": options},
                          batch_size=batch_size, batch_format="numpy", num_cpus=0.5)


def check_image_columns(shards: list[str], *, image_column: str, id_column: str | None,
                        options: StorageOptions | None = None) -> None:
    """Fail fast, from the footer of the first Parquet shard that exists, when the image or id column
    is missing or of the wrong type (a configuration mistake, not an error row per image)."""
    for shard in (s for s in shards if s.lower().endswith(PARQUET)):
        fs, path = storage.filesystem(shard, options)
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except FileNotFoundError:
            continue                                  # an error row when read
        except (pa.ArrowException, ValueError):
            continue                                  # not Parquet: an error row when read
        except OSError as e:
            raise storage.explain(e, shard) from None
        check_parquet_schema(schema, image_column=image_column, id_column=id_column, where=shard)
        return


MAX_SHARDS_PER_BLOCK = 16
BLOCKS_OF_ONE_SHARD = 256


def shards_per_block(n: int) -> int:
    """Shard names per input block: one while there are at most BLOCKS_OF_ONE_SHARD shards (a read task
    each, spread over the cluster), more for large archives, up to MAX_SHARDS_PER_BLOCK, so that 10^5
    shards are not 10^5 objects put by the driver."""
    return max(1, min(MAX_SHARDS_PER_BLOCK, -(-n // BLOCKS_OF_ONE_SHARD)))


def read_shards_decoded(shards: list[str], *, input_size: int, batch_size: int,
                        options: StorageOptions | None = None, image_column: str = "image",
                        id_column: str | None = None) -> ray.data.Dataset:
    """Ray Data dataset of decoded images (anomaly_core.decode.read_shards) of `shards`, in shard order
    and member order within a shard: each shard is fetched whole (one request) and decoded by one CPU
    task, never on the driver or a GPU actor, and comes out in batches of `batch_size` rows. Input
    blocks hold shards_per_block names; each call of read_shards still gets one shard."""
    per_block = shards_per_block(len(shards))
    ds = ray.data.from_arrow([pa.table({"shard": shards[s:s + per_block]}) for s in range(0, len(shards), per_block)])
    # half a CPU, as in read_decoded: reading stays out of the model actors
    return ds.map_batches(read_shards, fn_kwargs={"input_size": input_size, "batch_rows": batch_size,
                                                  "options": options, "image_column": image_column,
                                                  "id_column": id_column},
                          batch_size=1, batch_format="numpy", num_cpus=0.5)
