"""Image shards: many images in one object, read with one request.

Two forms, told apart by the name's suffix:

- `.tar` in the WebDataset convention: each member's key is its path up to the first dot of its base name
  and its extension the rest (`a/0001.jpg`, `a/0001.cls` and `a/0001.seg.png` are one sample, key
  `a/0001`, extensions `jpg`, `cls`, `seg.png`). A sample is one image: of its members whose extension
  ends with an image extension (anomaly_core.images.IMAGE_EXTENSIONS), the first by IMAGE_PREFERENCE, a
  plain extension (`png`) before a compound one (`seg.png`, a mask or another view); its other members
  (labels, metadata, masks) are ignored. A member name repeated later in the tar replaces the earlier
  one, as extracting the tar would.
- `.parquet`: a table with an image column, either a struct with `bytes` (and `path`), as Hugging Face
  datasets store images, or a binary column; optionally an id column.

Each image gets a stable URI naming where it lies: `<shard>#<member name>` for a tar member,
`<shard>#row=<i>` for Parquet row i (0-based over the file), or `<shard>#<id>` with an id column.
`shard_of(uri)` gives the shard back. Reading yields (uri, bytes, error) samples; what cannot be read
becomes a sample with an error (empty bytes), never an exception: a corrupt member or cell is one error
sample, a truncated tar yields its readable members and one error sample naming the shard, and a file
that is no tar or Parquet at all is one error sample naming the shard.
"""

from __future__ import annotations

import io
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from anomaly_core import storage
from anomaly_core.images import IMAGE_EXTENSIONS
from anomaly_core.storage import StorageOptions

TAR, PARQUET = ".tar", ".parquet"
SHARD_SUFFIXES = (TAR, PARQUET)
IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTENSIONS)
# which member of a WebDataset sample is its image: the first of these extensions it has
IMAGE_PREFERENCE = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
assert sorted(IMAGE_PREFERENCE) == sorted(IMAGE_EXTENSIONS)
# `<shard>#row=<i>` names Parquet row i: an id of that form would name another row
ROW_URI = re.compile(r"row=[0-9]+")

# (uri, bytes, error): error "" when the bytes are the image's; bytes b"" when error is set
Sample = tuple[str, bytes, str]

_RANGE = re.compile(r"\{([0-9]+)\.\.([0-9]+)\}")


def is_shard(uri: str) -> bool:
    return uri.lower().endswith(SHARD_SUFFIXES)


def shard_of(uri: str) -> str:
    """The shard URI of an image URI from a shard (`<shard>#...`); a URI without '#' is its own shard
    (the row of a shard nothing could be read from)."""
    return uri.partition("#")[0]


def expand_braces(uri: str) -> list[str]:
    """`shard-{000000..000002}.tar` -> [shard-000000.tar, shard-000001.tar, shard-000002.tar]. Numbers
    are padded to the width of the bounds when both have the same number of digits (as WebDataset's
    brace expansion does); several ranges multiply out, left to right. A URI without a range: [uri]."""
    m = _RANGE.search(uri)
    if m is None:
        return [uri]
    lo, hi = m.groups()
    if int(hi) < int(lo):
        raise ValueError(f"{uri!r}: range {{{lo}..{hi}}} ends before it starts; write {{{hi}..{lo}}}")
    width = len(lo) if len(lo) == len(hi) else 0
    head, tail = uri[:m.start()], uri[m.end():]
    return [head + str(i).zfill(width) + rest for i in range(int(lo), int(hi) + 1) for rest in expand_braces(tail)]


def sample_key(member: str) -> tuple[str, str]:
    """(key, extension) of a tar member in the WebDataset convention: "a/0001.seg.png" -> ("a/0001",
    "seg.png"); the extension is "" when the base name has no dot."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def image_rank(ext: str) -> tuple[int, int] | None:
    """Sort key of a member's extension among its sample's images (lower first), None when it is no image:
    a plain image extension by IMAGE_PREFERENCE, then a compound one ending with one (`seg.png`)."""
    ext = ext.lower()
    if ext in IMAGE_PREFERENCE:
        return 0, IMAGE_PREFERENCE.index(ext)
    last = ext.rpartition(".")[2]
    return (1, IMAGE_PREFERENCE.index(last)) if last in IMAGE_PREFERENCE else None


def tar_samples(shard: str, data: bytes) -> Iterator[Sample]:
    """The image samples of tar file `shard` whose bytes are `data`, one per WebDataset sample (module
    docstring), in the order of each sample's first member."""
    found: dict[str, tuple[tuple[int, int], Sample]] = {}     # key -> (rank, sample of its image)
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as e:
        yield shard, b"", f"{shard}: not a readable tar file ({e})"
        return
    failure = ""
    while True:
        try:
            member = tf.next()
        except (tarfile.TarError, EOFError) as e:
            failure = str(e)
            break
        if member is None:
            # tarfile ends quietly at a header cut short: anything but end-of-archive zeros is lost data
            if data[tf.offset:].strip(b"\0"):
                failure = f"{len(data) - tf.offset} bytes after the last whole member are not a member"
            break
        key, ext = sample_key(member.name)
        rank = image_rank(ext) if member.isfile() else None
        if rank is None or (key in found and found[key][0] < rank):
            continue
        uri = f"{shard}#{member.name}"
        try:
            found[key] = (rank, (uri, tf.extractfile(member).read(), ""))
        except (tarfile.TarError, EOFError) as e:
            found[key] = (rank, (uri, b"", f"{uri}: member cut short ({e})"))
            failure = str(e)
            break
    yield from (sample for _, sample in found.values())
    if failure:
        yield shard, b"", f"{shard}: truncated or corrupt tar after {len(found)} image members ({failure})"
    elif not found:
        yield shard, b"", f"{shard}: no image members (extensions: {', '.join(IMAGE_EXTENSIONS)})"


def image_column_bytes(column: pa.ChunkedArray | pa.Array, name: str) -> list[bytes | None]:
    """An image column -> its bytes per row (None for a null cell): a struct column's `bytes` field
    (Hugging Face's Image feature) or a binary column. Raises ValueError naming the type otherwise."""
    typ = column.type
    if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
        column, typ = pc.struct_field(column, "bytes"), typ.field("bytes").type
    if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
        raise ValueError(f"image column {name!r} has type {typ}; it must be binary or a struct with a binary "
                         f"'bytes' field (Hugging Face's Image feature); name it with --image-column")
    return column.to_pylist()


def check_parquet_schema(schema: pa.Schema, *, image_column: str, id_column: str | None, where: str) -> None:
    """Raise ValueError naming the columns there are when `schema` has no usable image column or lacks
    the id column: a configuration mistake, found on the driver from the first shard's footer."""
    for name in [image_column] + ([id_column] if id_column else []):
        if schema.get_field_index(name) < 0:
            raise ValueError(f"{where} has no column {name!r}; its columns: {schema.names}. Name the image "
                             f"column with --image-column and the id column with --id-column")
    image_column_bytes(pa.array([], schema.field(image_column).type), image_column)


def row_uri(shard: str, i: int, key, seen: set[str]) -> tuple[str, str]:
    """(uri, error) of Parquet row `i` whose id is `key` (None: no id), `seen` the URIs of the rows
    before it: `<shard>#<id>`, else `<shard>#row=<i>` with an error when the id repeats one of `seen` or
    has the form row=<n> (it could name another row). Every row of a file so gets its own URI."""
    uri = f"{shard}#row={i}"
    if key is None:
        return uri, ""
    if ROW_URI.fullmatch(str(key)):
        return uri, f"{uri}: id {key!r} has the form row=<n>, which names rows by number; use other ids"
    if f"{shard}#{key}" in seen:
        return uri, f"{uri}: id {key!r} repeats an earlier row's"
    return f"{shard}#{key}", ""


def parquet_samples(shard: str, data: bytes, *, image_column: str = "image",
                    id_column: str | None = None) -> Iterator[Sample]:
    """The image samples of Parquet file `shard` whose bytes are `data`, row by row. A row group that
    cannot be decoded gives an error sample per row (`#row=<i>`, ids being unreadable too); a null id
    gives `#row=<i>`, and so does a repeated id or one of the form row=<n>, with an error (row_uri)."""
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        check_parquet_schema(pf.schema_arrow, image_column=image_column, id_column=id_column, where=shard)
    except (pa.ArrowException, ValueError, OSError) as e:    # bytes in memory: no storage error can occur
        yield shard, b"", f"{shard}: not a readable Parquet image table ({e})"
        return
    columns = [image_column] + ([id_column] if id_column else [])
    seen: set[str] = set()
    start = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            table = pf.read_row_group(g, columns=columns)
            blobs = image_column_bytes(table[image_column], image_column)
            ids = table[id_column].to_pylist() if id_column else [None] * n
        except (pa.ArrowException, ValueError, OSError) as e:
            for i in range(start, start + n):
                yield f"{shard}#row={i}", b"", f"{shard}: row group {g} (rows {start}-{start + n - 1}) unreadable ({e})"
            start += n
            continue
        for i, (blob, key) in enumerate(zip(blobs, ids, strict=True), start=start):
            uri, error = row_uri(shard, i, key, seen)
            if not error and blob is None:
                error = f"{uri}: no image bytes in column {image_column!r}"
            seen.add(uri)
            yield uri, b"" if error else blob, error
        start += n
    if start == 0:
        yield shard, b"", f"{shard}: no rows"


def shard_samples(shard: str, data: bytes, *, image_column: str = "image",
                  id_column: str | None = None) -> Iterator[Sample]:
    """tar_samples or parquet_samples by the shard's suffix."""
    if shard.lower().endswith(TAR):
        return tar_samples(shard, data)
    if shard.lower().endswith(PARQUET):
        return parquet_samples(shard, data, image_column=image_column, id_column=id_column)
    raise ValueError(f"{shard!r} is not a shard: names end with {' or '.join(SHARD_SUFFIXES)}")


def read_image(uri: str, options: StorageOptions | None = None, *, image_column: str = "image",
               id_column: str | None = None, cache: ShardCache | None = None) -> bytes:
    """The bytes of the image at `uri`: an object, or an image in a shard (`<shard>#<member>`,
    `<shard>#row=<i>`, `<shard>#<id>`; the shard is fetched whole, or taken from `cache`, which then
    keeps it). FileNotFoundError when there is none."""
    shard = shard_of(uri)
    if shard == uri or not is_shard(shard):
        return storage.read_bytes(uri, options)

    def images() -> dict[str, bytes]:
        data = storage.read_bytes(shard, options)
        return {name: blob for name, blob, error in shard_samples(shard, data, image_column=image_column,
                                                                  id_column=id_column) if not error}

    found = (images() if cache is None else cache.get((shard, image_column, id_column), images)).get(uri)
    if found is None:
        raise FileNotFoundError(f"{uri} not found: {shard} holds no readable image by that name")
    return found


class ShardCache:
    """The readable images of recently read shards ({uri: bytes} per shard), up to `max_bytes` of image
    bytes, the least recently used shard dropped first: a page that shows many images of one shard
    fetches it once. Safe to share between threads: while one thread fetches a shard, the others asking
    for it wait for that fetch. A shard holding more than `max_bytes` is not kept (each read fetches it)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._shards: OrderedDict[tuple, dict[str, bytes]] = OrderedDict()
        self._sizes: dict[tuple, int] = {}
        self._fetching: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Image bytes held now."""
        with self._lock:
            return sum(self._sizes.values())

    def get(self, key: tuple, fetch: Callable[[], dict[str, bytes]]) -> dict[str, bytes]:
        """The images of the shard `key` names: kept ones, or fetch()'s, which are then kept."""
        while True:
            with self._lock:
                if key in self._shards:
                    self._shards.move_to_end(key)
                    return self._shards[key]
                waiting = self._fetching.get(key)
                if waiting is None:
                    done = self._fetching[key] = threading.Event()
            if waiting is None:
                break
            waiting.wait()           # kept by then, unless too large or failed: then fetched here
        try:
            images = fetch()
            size = sum(map(len, images.values()))
            with self._lock:
                if size <= self.max_bytes:
                    self._shards[key], self._sizes[key] = images, size
                    while sum(self._sizes.values()) > self.max_bytes:
                        old, _ = self._shards.popitem(last=False)
                        del self._sizes[old]
            return images
        finally:
            with self._lock:
                del self._fetching[key]
            done.set()


def pack_tar(members: Sequence[tuple[str, bytes]]) -> bytes:
    """(member name, bytes) pairs -> the bytes of one uncompressed tar holding them in that order (file
    mode 0644, mtime 0, so the same images always give the same bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blob), 0o644, 0
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()
