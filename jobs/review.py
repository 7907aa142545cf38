"""`anomaly review OUT`: a local web page to go through scored images and label them.

A Starlette app served by uvicorn. It reads the complete runs under OUT through DuckDB
(jobs.analyst.connect) and does all filtering, sorting and paging in SQL, so the browser only ever holds
one page of rows however large the output is. Images are read from their uri, an object or a member of
a shard (anomaly_core.shards.read_image: a shard is fetched whole, and kept in a cache bounded in bytes,
so a page of images of one shard fetches it once), and each overlay is rebuilt from the row's stored
grid (decode_heatmap) when the browser asks for it; a small cache keeps the ones just seen.
Labels go through jobs.labels.append_labels, one file per label, so several reviewers (each
running the page) can label the same output at once.

The page binds to 127.0.0.1 unless asked otherwise; it has no login, so whoever reaches the port can
label under the reviewer name it was started with. Only images that are rows of OUT are ever served,
and only rows that were scored can be labelled: an error row has no image content to key a label on.

API (JSON unless said): GET /api/facets, /api/rows?<filters>, /api/row?run_id=&uri=, /api/image?run_id=
&uri=&kind=image|overlay&size= (JPEG), /api/drift, /api/drift.png; POST /api/labels {run_id, uri, label,
comment}. The page itself is jobs/review_static/.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import io
import logging
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_core import storage
from anomaly_core.artifact import read_manifest
from anomaly_core.images import ImageDecodeError, decode_image
from anomaly_core.schema import HEATMAP_COLUMNS
from anomaly_core.scoring import decode_heatmap
from anomaly_core.shards import ShardCache, read_image
from anomaly_core.storage import StorageOptions
from jobs.analyst import connect, fetch
from jobs.labels import LABELS, LabelCache, append_labels, check_reviewer, create_labels_view
from jobs.report import (
    DRIFT_BOUND,
    DRIFT_NIGHTS,
    calibration_reference,
    drift_figure,
    figure_data_uri,
    night_drift,
    overlay,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("review_static")
PAGE_SIZE, MAX_PAGE = 50, 200
IMAGE_SIZES = (240, 800)                 # thumbnail and detail view: the longer side, px
VERDICTS = ("anomalous", "normal", "review", "error")
LABEL_FILTERS = ("any", "unlabelled", "labelled", *LABELS)
# an error row's score is NaN, which DuckDB orders above every number and counts >= any bound: as NULL
# it sorts last and no score range keeps it
SCORE = "nullif(s.score, 'NaN'::FLOAT)"
# ORDER BY of each sort the page offers; uri and run_id last, so pages never overlap or skip a row
SORTS = {
    "score_desc": f"{SCORE} DESC NULLS LAST, s.uri, s.run_id",
    "score_asc": f"{SCORE} ASC NULLS LAST, s.uri, s.run_id",
    "date_desc": f"s.run_date DESC, {SCORE} DESC NULLS LAST, s.uri, s.run_id",
    "date_asc": f"s.run_date ASC, {SCORE} DESC NULLS LAST, s.uri, s.run_id",
    "uri": "s.uri, s.run_date DESC, s.run_id",
    "labelled_desc": f"l.labelled_at DESC NULLS LAST, {SCORE} DESC NULLS LAST, s.uri, s.run_id",
}
SHORTCUTS = [("j / k", "next / previous image"), ("Enter or o", "open the detail view"), ("Esc", "close it"),
             ("d", "label defect"), ("n", "label normal (false alarm)"),
             ("c", "write a comment (Esc leaves the box), then d or n"),
             ("] / [", "next / previous page"), ("/", "search the uri")]
# the columns a list row carries to the page
LIST_COLUMNS = ("s.run_id, s.run_date, s.uri, s.product, s.line, s.status, s.error, s.verdict, s.score, "
                "s.score_normalised, l.label, l.reviewer, l.comment, strftime(l.labelled_at, '%Y-%m-%d %H:%M:%S UTC') "
                "AS labelled_at")


def _choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _number(name: str, value: str | None, kind=float):
    if value in (None, ""):
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a {kind.__name__}") from None


def _date(name: str, value: str | None) -> dt.date | None:
    if value in (None, ""):
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a date YYYY-MM-DD") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Filters:
    """What the page asks for: filters, sort and page. Every value reaches SQL as a parameter."""
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    product: str | None = None
    line: str | None = None
    verdict: str | None = None
    score_min: float | None = None
    score_max: float | None = None
    label: str = "any"
    q: str | None = None                 # part of the uri
    sort: str = "score_desc"
    offset: int = 0
    limit: int = PAGE_SIZE

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Filters:
        """From query parameters; a bad value raises ValueError naming it and what is accepted."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(params) - known):
            raise ValueError(f"unknown filter {unknown[0]!r}; use {', '.join(sorted(known))}")
        text = {k: (params.get(k) or None) for k in ("product", "line", "q")}
        offset, limit = _number("offset", params.get("offset"), int), _number("limit", params.get("limit"), int)
        if (offset or 0) < 0 or not 1 <= (limit or PAGE_SIZE) <= MAX_PAGE:
            raise ValueError(f"offset={offset} must be >= 0 and limit={limit} in [1, {MAX_PAGE}]")
        return cls(date_from=_date("date_from", params.get("date_from")),
                   date_to=_date("date_to", params.get("date_to")), **text,
                   verdict=_choice("verdict", params["verdict"], VERDICTS) if params.get("verdict") else None,
                   score_min=_number("score_min", params.get("score_min")),
                   score_max=_number("score_max", params.get("score_max")),
                   label=_choice("label", params.get("label") or "any", LABEL_FILTERS),
                   sort=_choice("sort", params.get("sort") or "score_desc", SORTS),
                   offset=offset or 0, limit=limit or PAGE_SIZE)

    def where(self) -> tuple[str, list]:
        """(SQL WHERE clause over scores s LEFT JOIN labels l, its parameters)."""
        conds, args = ["TRUE"], []
        for cond, value in (("s.run_date >= ?", self.date_from), ("s.run_date <= ?", self.date_to),
                            ("s.product = ?", self.product), ("s.line = ?", self.line),
                            ("s.verdict = ?", self.verdict), (f"{SCORE} >= ?", self.score_min),
                            (f"{SCORE} <= ?", self.score_max), ("contains(s.uri, ?)", self.q)):
            if value is not None:
                conds.append(cond)
                args.append(value)
        if self.label == "unlabelled":
            conds.append("l.label IS NULL")
        elif self.label == "labelled":
            conds.append("l.label IS NOT NULL")
        elif self.label != "any":
            conds.append("l.label = ?")
            args.append(self.label)
        return " AND ".join(conds), args


def _jsonable(row: dict) -> dict:
    """A DuckDB row for JSON: dates as ISO text, NaN as null, binary columns left out."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dt.datetime | dt.date):
            v = v.isoformat()
        elif isinstance(v, float) and not np.isfinite(v):
            v = None
        elif isinstance(v, bytes):
            continue
        out[k] = v
    return out


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


class ReviewData:
    """What the page shows, from OUT: one DuckDB connection used under a lock (the server runs requests
    in threads). New runs appear after `refresh_s` (the output is listed again); new labels, of this page
    or of other reviewers, on every query (read once each, LabelCache)."""

    def __init__(self, out: str, *, reviewer: str, model: str | None = None, options: StorageOptions | None = None,
                 refresh_s: float = 30.0, cache_images: int = 512, cache_shards_mb: int = 256,
                 image_column: str = "image", id_column: str | None = None):
        """cache_images: JPEGs kept (image or overlay at one size); cache_shards_mb: image bytes of the
        shards last read kept (ShardCache). image_column, id_column: those the output's Parquet shards
        were scored with (`anomaly score --image-column/--id-column`), to find `<shard>.parquet#<id>`."""
        self.out, self.options = storage.normalise(out), (options or StorageOptions()).resolved()
        self.columns = {"image_column": image_column, "id_column": id_column}
        self.reviewer, self.refresh_s = check_reviewer(reviewer), refresh_s
        if not storage.list_files(storage.join(self.out, "_runs"), self.options, suffixes=(".json",)):
            raise FileNotFoundError(f"{self.out} holds no complete run: run `anomaly score ARCHIVE MODEL "
                                    f"{out}` first (or check the path)")
        self.manifest = read_manifest(storage.normalise(model), self.options) if model else None
        self._lock = threading.Lock()
        self._con, self._connected = None, 0.0
        self._labels = LabelCache(self.out, self.options)
        self.image = functools.lru_cache(maxsize=cache_images)(self._image)
        self.shards = ShardCache(cache_shards_mb * 2 ** 20)

    def _connection(self):
        """The connection, with the labels as they are now; reconnected (new runs) after refresh_s.
        Call with the lock held."""
        if self._con is None or time.monotonic() - self._connected > self.refresh_s:
            self._con = connect(self.out, self.options, labels=self._labels)
            self._connected = time.monotonic()
        else:
            create_labels_view(self._con, self.out, self.options, cache=self._labels)
        return self._con

    def _query(self, sql: str, args=None) -> list[dict]:
        with self._lock:
            return fetch(self._connection(), sql, args)

    def facets(self) -> dict:
        """Choices for the filters, and what the page says about itself."""
        (span,) = self._query("SELECT min(run_date) AS first, max(run_date) AS last, count(*) AS rows, "
                              "list(DISTINCT model_id ORDER BY model_id) AS models FROM scores")
        values = {c: [r["v"] for r in self._query(f"SELECT DISTINCT {c} AS v FROM scores ORDER BY v")]
                  for c in ("product", "line")}
        model = None
        if self.manifest:
            model = {"model_id": self.manifest["model_id"], "created_at": self.manifest["created_at"]}
        return _jsonable({**span, **{f"{c}s": v for c, v in values.items()}}) | {
            "out": self.out, "reviewer": self.reviewer, "verdicts": list(VERDICTS), "labels": list(LABELS),
            "label_filters": list(LABEL_FILTERS), "sorts": list(SORTS), "shortcuts": SHORTCUTS, "model": model,
            "page_size": PAGE_SIZE}

    def rows(self, f: Filters) -> dict:
        """One page of rows matching `f`, and how many match in all."""
        where, args = f.where()
        base = f"FROM scores s LEFT JOIN labels l ON l.content_sha256 = s.content_sha256 WHERE {where}"
        with self._lock:                         # the count and the page see the same labels
            con = self._connection()
            (n,) = fetch(con, f"SELECT count(*) AS n {base}", args)
            page = fetch(con, f"SELECT {LIST_COLUMNS} {base} ORDER BY {SORTS[f.sort]} LIMIT ? OFFSET ?",
                         [*args, f.limit, f.offset])
        return {"total": n["n"], "offset": f.offset, "limit": f.limit, "rows": [_jsonable(r) for r in page]}

    def _row(self, run_id: str, uri: str, columns: str) -> dict:
        rows = self._query(f"SELECT {columns} FROM scores WHERE run_id = ? AND uri = ? LIMIT 1", [run_id, uri])
        if not rows:
            raise KeyError(f"no row of run {run_id!r} for {uri!r} in {self.out}")
        return rows[0]

    def row(self, run_id: str, uri: str) -> dict:
        """The detail view: every column but the heatmap's, and the image's labels, newest first."""
        row = self._row(run_id, uri, f"* EXCLUDE ({', '.join(HEATMAP_COLUMNS)})")
        history = self._query("SELECT label, comment, reviewer, strftime(labelled_at, '%Y-%m-%d %H:%M:%S UTC') AS "
                              "labelled_at FROM all_labels WHERE content_sha256 = ? ORDER BY all_labels.labelled_at "
                              "DESC, reviewer DESC, label DESC", [row["content_sha256"]])
        return _jsonable(row) | {"labels": [_jsonable(h) for h in history]}

    def _image(self, run_id: str, uri: str, kind: str, size: int) -> bytes:
        """JPEG of the image (kind "image") or of its heatmap overlay ("overlay"), longer side at most
        `size` px. The overlay is laid over the image at that size, so a large original is not blown up
        to its full resolution first."""
        _choice("kind", kind, ("image", "overlay"))
        _choice("size", size, IMAGE_SIZES)
        row = self._row(run_id, uri, f"uri, status, error, threshold, {', '.join(HEATMAP_COLUMNS)}")
        try:
            image = decode_image(read_image(uri, self.options, **self.columns, cache=self.shards))
        except (OSError, ImageDecodeError) as e:
            raise FileNotFoundError(f"{uri} cannot be read: {e}") from None
        im = Image.fromarray(image)
        im.thumbnail((size, size))
        image = np.asarray(im)
        if kind == "overlay":
            if row["heatmap_grid"] is None and row["heatmap_png"] is None:
                raise FileNotFoundError(f"{uri} has no heatmap (status {row['status']}: {row['error']})")
            image = overlay(image, decode_heatmap(row), threshold=float(row["threshold"]))
        return _jpeg(image)

    def label(self, body: Mapping) -> dict:
        """Append the reviewer's label of a row ({run_id, uri, label, comment}); the image's identity
        (content_sha256) comes from the row, never from the page. An error row is refused (ValueError): its
        image was not read, so its content_sha256 is that of no bytes, which every unreadable image shares,
        and a label of it would apply to all of them."""
        if not isinstance(body, Mapping):
            raise ValueError("send a JSON object {run_id, uri, label, comment}")
        row = self._row(str(body.get("run_id")), str(body.get("uri")), "uri, content_sha256, status, error")
        if row.pop("status") == "error":
            raise ValueError(f"{row['uri']} was not scored ({row['error']}): an error row has no image to label; "
                             f"fix or restore the image and score it again")
        row.pop("error")
        comment = body.get("comment")
        append_labels(self.out, [{**row, "label": body.get("label"), "comment": comment if comment else None}],
                      reviewer=self.reviewer, options=self.options)
        return self.row(str(body["run_id"]), row["uri"])

    def drift(self, *, nights: int = DRIFT_NIGHTS, bound: float = DRIFT_BOUND) -> dict:
        """Recent nights' score quantiles against the model's calibration (jobs.report.night_drift)."""
        with self._lock:
            rows = night_drift(self._connection(), nights=nights, bound=bound)
        reference = calibration_reference(self.manifest) if self.manifest else None
        return {"bound": bound, "nights": [_jsonable(r) for r in rows], "reference": reference,
                "figure": figure_data_uri(drift_figure(rows, reference=reference, bound=bound))}


def create_app(data: ReviewData, *, allowed_hosts: list[str] | None = None):
    """The Starlette app of the page over `data`. allowed_hosts: Host headers accepted (None: any), so
    a page on 127.0.0.1 cannot be reached through another name pointed at it (DNS rebinding)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def answer(fn):
        """Run fn; a bad request is a 400 naming the value, a missing row or file a 404."""
        try:
            return fn()
        except KeyError as e:
            return JSONResponse({"error": e.args[0]}, status_code=404)
        except FileNotFoundError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)

    def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def facets(request):
        return answer(lambda: JSONResponse(data.facets()))

    def rows(request):
        return answer(lambda: JSONResponse(data.rows(Filters.parse(request.query_params))))

    def row(request):
        q = request.query_params
        return answer(lambda: JSONResponse(data.row(q.get("run_id", ""), q.get("uri", ""))))

    def image(request):
        q = request.query_params
        return answer(lambda: Response(
            data.image(q.get("run_id", ""), q.get("uri", ""), q.get("kind", "image"),
                       _number("size", q.get("size"), int) or IMAGE_SIZES[0]),
            media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}))

    def drift(request):
        return answer(lambda: JSONResponse(data.drift()))

    async def labels(request):
        # JSON only: a form on another site cannot post here without the browser asking first (CORS)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send the label as application/json"}, status_code=415)
        try:
            return JSONResponse(await run_in_threadpool(data.label, await request.json()))
        except KeyError as e:
            return JSONResponse({"error": e.args[0]}, status_code=404)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)

    routes = [Route("/", index), Route("/api/facets", facets), Route("/api/rows", rows), Route("/api/row", row),
              Route("/api/image", image), Route("/api/drift", drift), Route("/api/labels", labels, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    return Starlette(routes=routes, middleware=middleware)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or an error saying what to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port (0: any free "
                      f"port) or --host") from None
    sock.listen(128)
    return sock


def serve(out: str, *, model: str | None = None, host: str = "127.0.0.1", port: int = 8050,
          reviewer: str, options: StorageOptions | None = None, image_column: str = "image",
          id_column: str | None = None) -> None:
    """Serve the review page of OUT until interrupted; prints its address first. image_column,
    id_column: ReviewData's."""
    import uvicorn
    data = ReviewData(out, reviewer=reviewer, model=model, options=options, image_column=image_column,
                      id_column=id_column)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    if host not in LOOPBACK:
        log.warning("review: listening on %s: the page has no login; anyone who reaches port %d can label "
                    "as %r", host, port, data.reviewer)
    allowed = [*LOOPBACK, f"{host}"] if host in LOOPBACK else None
    shown = f"[{host}]" if ":" in host else host
    print(f"Review page of {data.out}: http://{shown}:{port}/ (reviewer {data.reviewer}; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(create_app(data, allowed_hosts=allowed), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
