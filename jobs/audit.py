"""An audit described by a YAML file: what `anomaly score --config` and `python -m jobs score --config` run.

    model: s3://models/metal-plate            # written by `anomaly fit`
    model_id: "3f0c9a1b2c3d4e5f"              # optional, quoted: refuse any other model at that location
    archive: s3://archive/line-3/{date}/      # folder, s3:// prefix or manifest file; {date} = audit date;
                                              # or shards: s3://shards/line-3/{date}/shard-{000000..000099}.tar
    output: s3://audits/metal-plate           # Parquet rows, partitioned by run_date
    date: yesterday                           # audit date: YYYY-MM-DD, today or yesterday (UTC); null: today
    resources: {batch_size: 16, actors: null, device: auto, rows_per_file: 1024}
    storage: {endpoint_url: null, region: null, anonymous: false, connect_timeout_s: 10, request_timeout_s: 60}
    ray: {address: null, shared_fs: false}    # null: $RAY_ADDRESS, else Ray in-process; shared_fs: local
                                              # paths are mounted alike on every node
    input: {image_column: image, id_column: null}   # Parquet shards: image-bytes column, optional id column

cluster/audit.yaml is a complete example.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import yaml

from anomaly_core.artifact import ModelFileError, check_model_id
from anomaly_core.storage import StorageOptions


def resolve_date(value: str | None, *, today: dt.date | None = None) -> str:
    """An audit date as YYYY-MM-DD from YYYY-MM-DD, "today" or "yesterday" (UTC); None means today.
    A nightly job started after midnight audits "yesterday"."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    relative = {"today": today, "yesterday": today - dt.timedelta(days=1)}
    if value is None or str(value) in relative:
        return relative[str(value or "today")].isoformat()
    try:
        return dt.date.fromisoformat(str(value)).isoformat()
    except ValueError:
        raise ValueError(f"date {value!r} must be YYYY-MM-DD (e.g. 2026-11-22), today or yesterday") from None


SECTIONS = {"resources": ("batch_size", "actors", "device", "rows_per_file"), "ray": ("address", "shared_fs"),
            "input": ("image_column", "id_column")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Audit:
    model: str                         # model URI
    model_id: str | None = None        # the id the model must have (pinned); None: whatever model is there
    archive: str | list[str]           # image URIs to audit; "{date}" is replaced by the audit date
    output: str                        # output URI
    date: str | None = None            # audit date: YYYY-MM-DD, "today" or "yesterday" (UTC, at run time); None: today
    batch_size: int = 16               # images per batch on an actor
    actors: int | None = None          # scoring actors; None: one per GPU, else one per 4 CPUs
    device: str = "auto"               # auto, cpu or cuda
    rows_per_file: int = 1024          # rows per committed Parquet file (what a killed run can lose)
    address: str | None = None         # Ray address; None: $RAY_ADDRESS, else in-process
    shared_fs: bool = False            # local paths are on a file system every Ray node mounts alike
    image_column: str = "image"        # Parquet shards: the image column (struct with bytes, or binary)
    id_column: str | None = None       # Parquet shards: a column of unique image ids (None: row numbers)
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

    def archive_for(self, date: str) -> str | list[str]:
        """The archive URI(s) of one audit date."""
        if isinstance(self.archive, str):
            return self.archive.replace("{date}", date)
        return [a.replace("{date}", date) for a in self.archive]


def _known(where: str, got: dict, valid) -> None:
    unknown = sorted(set(got) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")


def load_audit(path: str | Path) -> Audit:
    """Parse and check an audit file; every mistake names the file, the key and the valid choices."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"audit file {path} not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys (model, archive, output, ...), got {type(raw).__name__}")
    top = ("model", "model_id", "archive", "output", "date", "storage", *SECTIONS)
    _known(str(path), raw, top)
    missing = [k for k in ("model", "archive", "output") if not raw.get(k)]
    if missing:
        raise ValueError(f"{path}: missing required key(s) {missing}")
    values = {k: raw[k] for k in ("model", "model_id", "archive", "output", "date") if k in raw}
    if values.get("model_id") is not None:
        try:
            check_model_id(str(values["model_id"]), where=f"{path} [model_id]")
        except ModelFileError as e:
            raise ValueError(str(e)) from None
        values["model_id"] = str(values["model_id"])
    if values.get("date") is not None:
        values["date"] = str(values["date"])              # YAML reads 2026-11-22 as a date
        try:
            resolve_date(values["date"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for section in ("storage", *SECTIONS):
        if not isinstance(raw.get(section) or {}, dict):
            raise ValueError(f"{path} [{section}]: expected a mapping such as {{key: value}}, "
                             f"got {raw[section]!r}")
    for section, keys in SECTIONS.items():
        sub = raw.get(section) or {}
        _known(f"{path} [{section}]", sub, keys)
        values.update(sub)
    if not isinstance(values.get("shared_fs", False), bool):
        raise ValueError(f"{path} [ray]: shared_fs must be true or false, got {values['shared_fs']!r}")
    st = raw.get("storage") or {}
    _known(f"{path} [storage]", st, [f.name for f in dataclasses.fields(StorageOptions)])
    try:
        values["storage"] = StorageOptions(**st)
        return Audit(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
