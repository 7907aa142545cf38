"""Where bytes live: local paths and s3:// URIs behind one pyarrow FileSystem.

We use pyarrow's own S3FileSystem (the AWS C++ SDK) rather than s3fs. Ray Data and pyarrow.dataset use
it natively, it reads without holding the GIL, and it comes with the AWS SDK's standard credential chain
($AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY/$AWS_SESSION_TOKEN, $AWS_PROFILE and ~/.aws files, instance
metadata) and its standard retry strategy (exponential backoff on throttling, 5xx and dropped connections).
Credentials are never passed through this module: they stay in the environment or the profile, so they
cannot end up in a manifest, a log line or a Parquet file.

URIs: "s3://bucket/key/..." or a local path (absolute or relative, optionally "file://").
"""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs


class StorageError(OSError):
    """A permanent storage error (no such bucket, access denied): retrying cannot help, the job stops."""


@dataclass(frozen=True, kw_only=True)
class StorageOptions:
    """How to reach object storage. endpoint_url and region fall back to the standard environment
    variables; `resolved()` fixes them on the driver, so workers with another environment agree."""

    endpoint_url: str | None = None   # S3-compatible server (MinIO, Ceph, moto), e.g. http://127.0.0.1:9000;
                                      # None: $AWS_ENDPOINT_URL_S3, then $AWS_ENDPOINT_URL, else AWS itself
    region: str | None = None         # None: $AWS_REGION, then $AWS_DEFAULT_REGION, else us-east-1
    anonymous: bool = False           # public buckets: unsigned requests, no credential lookup
    max_attempts: int = 5             # tries per request on transient errors (AWS standard retry strategy)
    connect_timeout_s: float = 10.0   # seconds to open a connection before the attempt fails
    request_timeout_s: float = 60.0   # seconds a request may go without receiving a byte before the attempt
                                      # fails: a hung server ends a request after about max_attempts times this
                                      # (5 minutes by default), as a transient error naming the URI

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts} must be >= 1 (1 = no retry)")
        for name in ("connect_timeout_s", "request_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 3600):
                raise ValueError(f"{name}={value!r} must be a number of seconds in (0, 3600], e.g. 10 or 60")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url={self.endpoint_url!r} must start with http:// or https://, "
                             f"e.g. http://127.0.0.1:9000")

    def resolved(self) -> StorageOptions:
        """These options with the environment fallbacks filled in (they hold no secret)."""
        return dataclasses.replace(
            self,
            endpoint_url=(self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                          or os.environ.get("AWS_ENDPOINT_URL")),
            region=self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """URI of `parts` under `uri` ("/"-separated for both local paths and S3)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def normalise(uri: str) -> str:
    """One spelling per location: s3://bucket/key without "." / ".." / "//" or a trailing "/"; local paths
    absolute, without "file://". Do it on the driver: workers may run in another working directory."""
    if is_s3(uri):
        return "s3://" + posixpath.normpath(uri[len("s3://"):]).lstrip("/")
    filesystem(uri)                                  # rejects unsupported schemes
    return os.path.abspath(local_path(uri))


@functools.lru_cache(maxsize=8)
def _s3(options: StorageOptions) -> pafs.S3FileSystem:
    options = options.resolved()
    endpoint, region, scheme = options.endpoint_url, options.region, None
    if endpoint:
        scheme, _, endpoint = endpoint.partition("://")
    return pafs.S3FileSystem(
        region=region, endpoint_override=endpoint, scheme=scheme, anonymous=options.anonymous,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
        connect_timeout=options.connect_timeout_s, request_timeout=options.request_timeout_s)


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path inside it) for `uri`. The S3 filesystem is cached per options."""
    if is_s3(uri):
        return _s3(options or StorageOptions()), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri!r}: unsupported scheme; use s3://bucket/prefix or a local path")
    return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of filesystem(): the URI of `path` inside `fs`."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def explain(err: OSError, uri: str) -> OSError:
    """A permanent S3 error as a StorageError naming the bucket and key and what to check; a request that
    timed out on every attempt as a TimeoutError; other errors (network, throttling once retries are
    spent) come back unchanged with the URI added. Only StorageError is permanent."""
    text = str(err)
    bucket = uri[len("s3://"):].split("/", 1)[0] if is_s3(uri) else ""
    if "NO_SUCH_BUCKET" in text:
        return StorageError(f"{uri}: bucket {bucket!r} does not exist; create it or fix the URI")
    if any(code in text for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                                     "HTTP status 403")):
        return StorageError(f"{uri}: access denied to bucket {bucket!r}; check the credentials "
                            f"($AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY or $AWS_PROFILE) and the bucket policy")
    if isinstance(err, FileNotFoundError):
        return FileNotFoundError(f"{uri} not found")
    if "curlCode: 28" in text:                       # curl's "Timeout was reached", once retries are spent
        return TimeoutError(f"{uri}: the storage server did not answer in time (connect_timeout_s / "
                            f"request_timeout_s, every attempt); a re-run resumes: {text}")
    return type(err)(f"{uri}: {text}") if type(err) is OSError else err


def check_bucket(uri: str, options: StorageOptions | None = None) -> None:
    """Fail fast, before any work, when the bucket of an s3:// URI is missing or not accessible."""
    if not is_s3(uri):
        return
    fs, path = filesystem(uri, options)
    bucket = path.split("/", 1)[0]
    try:
        fs.get_file_info(pafs.FileSelector(bucket, recursive=False, allow_not_found=False))
    except OSError as e:
        raise explain(e, f"s3://{bucket}") from None


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise explain(e, uri) from None


def is_file(uri: str, options: StorageOptions | None = None) -> bool:
    """True when `uri` is a file (an object), not a folder (prefix) or nothing."""
    fs, path = filesystem(uri, options)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as e:
        raise explain(e, uri) from None


LIST_TRIES = 5     # listings of a folder whose files another process removes meanwhile, before giving up


def list_files(uri: str, options: StorageOptions | None = None, *, suffixes: tuple[str, ...] = (),
               skip_hidden: bool = True) -> list[str]:
    """Sorted URIs of the files under `uri` (recursively) whose lower-cased name ends with one of
    `suffixes` (all files when empty); [] when `uri` does not exist. skip_hidden: leave out names under
    `uri` starting with "." or "_" (temporary and bookkeeping files of our outputs, as pyarrow.dataset
    does); archives are listed with skip_hidden=False, since cameras name files _MG_1234.JPG."""
    fs, path = filesystem(uri, options)
    for attempt in range(LIST_TRIES):
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            break
        except FileNotFoundError as e:               # a file removed between the directory read and its stat
            if attempt == LIST_TRIES - 1:            # (local folders; another writer's lease, a temp file)
                raise explain(e, uri) from None
        except OSError as e:
            raise explain(e, uri) from None
    if not infos:
        check_bucket(uri, options)                   # an empty listing may hide a missing bucket
    rel = len(path) + 1
    return sorted(to_uri(fs, i.path) for i in infos
                  if i.type == pafs.FileType.File and (not suffixes or i.path.lower().endswith(suffixes))
                  and not (skip_hidden and any(part.startswith((".", "_")) for part in i.path[rel:].split("/"))))


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise explain(e, uri) from None


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write `data` so that readers see the whole object or nothing: an S3 object appears only when its
    upload completes; a local file is written beside its target and renamed into place."""
    fs, path = filesystem(uri, options)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            parent, name = os.path.split(path)
            fs.create_dir(parent, recursive=True)
            tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)                                           # rename(2): atomic
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise explain(e, uri) from None


def move(src: str, dst: str, options: StorageOptions | None = None) -> None:
    """Rename on local disk; server-side copy then delete on S3 (each object appears whole)."""
    fs, src_path = filesystem(src, options)
    _, dst_path = filesystem(dst, options)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(os.path.dirname(dst_path), recursive=True)
        fs.move(src_path, dst_path)
    except OSError as e:
        raise explain(e, src) from None


def delete(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a file or everything under a prefix; nothing when it does not exist."""
    fs, path = filesystem(uri, options)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
    except OSError as e:
        raise explain(e, uri) from None
