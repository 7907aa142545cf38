"""What people look at: a self-contained HTML report of a scored output, and one overlay PNG per part;
the drift of recent nights' scores against the model's calibration, which the review page shows too.

The report embeds every image as base64 so the file can be mailed. A small script counts images that
failed to load and records the count on <body data-broken-images>, which the browser test reads.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                      # no display on servers and in Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from anomaly_core import metrics  # noqa: E402
from anomaly_core.images import ImageDecodeError, decode_image  # noqa: E402
from anomaly_core.schema import HEATMAP_COLUMNS  # noqa: E402
from anomaly_core.scoring import decode_heatmap  # noqa: E402
from anomaly_core.shards import ShardCache, read_image  # noqa: E402
from anomaly_core.storage import StorageOptions  # noqa: E402
from jobs.analyst import connect, fetch, run_query  # noqa: E402

log = logging.getLogger(__name__)

THUMB = 200
SHARD_CACHE_BYTES = 256 * 2 ** 20     # image bytes of the shards last read, kept while the report is built

# Drift: a night is flagged when its median normalised score (0 = the calibration mean, 1 = the threshold)
# lies more than DRIFT_BOUND from 0, i.e. the typical part has moved a quarter of the way to the threshold
# (or as far the other way). With a threshold 1.65 standard deviations of the normal scores above their
# mean (a 5% false-alarm rate on a normal distribution) that is 0.4 of a standard deviation, which about
# doubles the false alarms; it is more than three times the sampling error of the median of 100 normal
# parts. Nights are compared over the last DRIFT_NIGHTS that have scores.
DRIFT_BOUND = 0.25
DRIFT_NIGHTS = 14
QUANTILES = {"p05": -1.6449, "p25": -0.6745, "median": 0.0, "p75": 0.6745, "p95": 1.6449}   # standard normal


def overlay(image: np.ndarray, heat: np.ndarray, *, threshold: float) -> np.ndarray:
    """image [H, W, 3] uint8, heat [S, S] float scores -> [H, W, 3] uint8 with the map laid over it.

    Colours are on a fixed scale (0 to 1.5 x threshold, "inferno") and opacity grows with the score, so
    overlays of different images compare, and normal regions stay visible underneath.
    """
    h, w = image.shape[:2]
    up = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
    v = np.clip(up / (1.5 * threshold), 0.0, 1.0)                               # [H, W]
    rgb = plt.get_cmap("inferno")(v)[..., :3] * 255.0                            # [H, W, 3]
    alpha = (0.15 + 0.6 * v)[..., None]
    return (image * (1 - alpha) + rgb * alpha).astype(np.uint8)


def mark_peak(image: np.ndarray, x: int, y: int) -> np.ndarray:
    """image [H, W, 3] uint8 -> a copy with a cyan ring around pixel (x, y), the map's strongest point (the
    row's peak_x, peak_y): where to look first, also where the overlay stays faint (below the threshold).
    The ring's radius is 4% of the image's shorter side, its width a quarter of that."""
    out = Image.fromarray(image)
    r = max(3, round(0.04 * min(image.shape[:2])))
    ImageDraw.Draw(out).ellipse((x - r, y - r, x + r, y + r), outline=(0, 255, 255), width=max(1, r // 4))
    return np.asarray(out)


def row_overlay(image: np.ndarray, row: dict, *, threshold: float) -> np.ndarray:
    """The image [H, W, 3] uint8 of an output row (heatmap columns, peak_x, peak_y) with its map laid over
    it and its peak ringed."""
    return mark_peak(overlay(image, decode_heatmap(row), threshold=threshold), int(row["peak_x"]), int(row["peak_y"]))


def _png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(arr: np.ndarray) -> np.ndarray:
    im = Image.fromarray(arr)
    im.thumbnail((THUMB, THUMB))
    return np.asarray(im)


def _pair(row: dict, threshold: float, **read) -> tuple[str, str] | None:
    """(original, overlay with the peak ringed) thumbnails of an output row as data URIs; None when the
    original cannot be read any more. read: options, image_column, id_column and cache of read_image (a
    file, an object or an image in a shard)."""
    try:
        image = decode_image(read_image(row["uri"], **read))
    except (OSError, ImageDecodeError) as e:
        log.warning("report: cannot read %s for its thumbnail: %s", row["uri"], e)
        return None
    return _png_b64(_thumb(image)), _png_b64(_thumb(row_overlay(image, row, threshold=threshold)))


def write_report(scores_dir: str, html_path: str, *, top: int = 12, labels: dict[str, str] | None = None,
                 title: str = "Anomaly audit", notes: list[str] | None = None,
                 manifest: dict | None = None, options: StorageOptions | None = None,
                 image_column: str = "image", id_column: str | None = None,
                 passed_defects: Sequence[str] = ()) -> Path:
    """Write the HTML report of every run under `scores_dir`.

    labels: optional {uri: defect type, "good" for normal} from ground truth; adds ROC and per-type metrics.
    notes: lines shown under the title (e.g. what an evaluation could not compute).
    manifest: the model's manifest: its calibration is drawn beside the nights' drift (calibration_reference).
    options: how the images of the worst rows are read where their uris are s3:// (object or shard member).
    image_column, id_column: those the Parquet shards were scored with, to find `<shard>.parquet#<id>`.
    passed_defects: uris of defective images that the verdict passed though the heatmap's peak lies on the
    defect (anomaly evaluate); the `top` highest-scoring of them are shown beside their heatmaps.
    Reviewers' labels under scores_dir/_labels add the precision of the verdicts per night and line.
    """
    if not any(Path(scores_dir).rglob("*.parquet")):
        raise FileNotFoundError(f"no Parquet files under {scores_dir}: run `anomaly score ... {scores_dir}` first")
    con = connect(scores_dir)
    rows = con.execute("SELECT uri, status, error, score, verdict, threshold, run_id, run_date, model_id "
                       "FROM scores").fetchall()
    ok = [r for r in rows if r[1] == "ok"]
    threshold = float(ok[0][5]) if ok else float("nan")
    scores = np.array([r[3] for r in ok], dtype=np.float64)
    n_anom = sum(r[4] == "anomalous" for r in ok)
    errors = [(r[0], r[2]) for r in rows if r[1] == "error"]
    warnings = [(r[0], r[2], r[3]) for r in rows if r[1] == "warning"]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Output <code>{html.escape(str(scores_dir))}</code>; runs "
             f"{', '.join(sorted({html.escape(str(r[6])) for r in rows}))}; model "
             f"{', '.join(sorted({html.escape(str(r[8])) for r in rows}))}; written "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
             *(f"<p class='note'>{html.escape(n)}</p>" for n in (notes or [])),
             "<h2>Summary</h2><table>"
             f"<tr><th>images</th><td>{len(rows)}</td></tr><tr><th>scored</th><td>{len(ok)}</td></tr>"
             f"<tr><th>anomalous</th><td>{n_anom} ({n_anom / max(len(ok), 1):.1%})</td></tr>"
             f"<tr><th>errors</th><td>{len(errors)}</td></tr>"
             f"<tr><th>to review (not fitted for)</th><td>{len(warnings)}</td></tr>"
             f"<tr><th>threshold</th><td>{threshold:.4f}</td></tr></table>"]
    if ok:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.hist(scores, bins=min(50, max(10, len(ok) // 4)), color="#4a78b0")
        ax.axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold:.3f}")
        ax.set_xlabel("image score (cosine distance)")
        ax.set_ylabel("images")
        ax.legend()
        parts.append(f"<h2>Score distribution</h2><img alt='score histogram' src='{figure_data_uri(fig)}'>")
        drift = night_drift(con)
        reference = calibration_reference(manifest) if manifest else None
        figure = figure_data_uri(drift_figure(drift, reference=reference))
        parts.append(drift_html(drift, reference=reference, figure_src=figure))
    parts.append(_reviewed_section(con))
    shards = ShardCache(SHARD_CACHE_BYTES)                 # the worst images of one shard: one fetch of it
    read = {"options": options, "image_column": image_column, "id_column": id_column, "cache": shards}
    select = (f"SELECT uri, score, score_normalised, verdict, image_term_score, peak_x, peak_y, "
              f"{', '.join(HEATMAP_COLUMNS)} "
              f"FROM scores WHERE status = 'ok'")
    worst = fetch(con, f"{select} ORDER BY score DESC LIMIT ?", [top])
    parts.append(f"<h2>Top {len(worst)} anomalies</h2>{_cards(worst, threshold, **read)}")
    if passed_defects:
        passed = fetch(con, f"{select} AND list_contains(?, uri) ORDER BY score DESC LIMIT ?",
                       [list(passed_defects), top])
        parts.append(f"<h2>Defects the heatmap finds and the verdict passes ({len(passed)} of "
                     f"{len(passed_defects)} shown)</h2>{_cards(passed, threshold, **read)}")
    if errors:
        items = "".join(f"<tr><td><code>{html.escape(u)}</code></td><td>{html.escape(e)}</td></tr>"
                        for u, e in errors)
        parts.append(f"<h2>Images with errors</h2><table><tr><th>image</th><th>error</th></tr>{items}</table>")
    if warnings:
        items = "".join(f"<tr><td><code>{html.escape(u)}</code></td><td>{s:.4f}</td><td>{html.escape(e)}</td></tr>"
                        for u, e, s in warnings)
        parts.append("<h2>Images the model was not fitted for (verdict: review)</h2><table><tr><th>image</th>"
                     f"<th>score</th><th>why</th></tr>{items}</table>")
    if labels:
        parts.append(_ground_truth_section(ok, labels, threshold))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}<script>{_CHECK_JS}</script></body></html>")
    out = Path(html_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    log.info("report: %s (%d rows, %d shown)", out, len(rows), len(worst))
    return out


def _cards(rows: list[dict], threshold: float, **read) -> str:
    """The rows (uri, score, score_normalised, verdict, image_term_score, peak_x, peak_y, heatmap columns)
    as cards: image, overlay, score, and whether the image-level term set it (the map then shows no
    patch that does)."""
    cards = []
    for row in rows:
        pair = _pair(row, threshold, **read)
        imgs = (f"<img alt='image' src='{pair[0]}'><img alt='heatmap overlay' src='{pair[1]}'>" if pair
                else "<p class='missing'>original image no longer readable</p>")
        cards.append(f"<div class='card'>{imgs}<p><b>{row['score']:.4f}</b> (normalised "
                     f"{row['score_normalised']:.2f}, {row['verdict']})"
                     f"{'<br>set by the whole image (image-level term)' if set_by_image_term(row) else ''}<br>"
                     f"<code>{html.escape(row['uri'])}</code></p></div>")
    return f"<div class='grid'>{''.join(cards)}</div>"


def _ground_truth_section(ok_rows, labels: dict[str, str], threshold: float) -> str:
    known = [(r[0], r[3]) for r in ok_rows if r[0] in labels]
    types = np.array([labels[u] for u, _ in known])
    scores = np.array([s for _, s in known], dtype=np.float64)
    y = types != "good"
    if y.all() or not y.any():
        return "<h2>Ground truth</h2><p>needs both good and defective images</p>"
    fpr, tpr = _roc(y, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, color="#4a78b0", label=f"AUROC {metrics.auroc(y, scores):.3f}")
    ax.plot([0, 1], [0, 1], color="#999", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    rows = []
    for t in sorted(set(types) - {"good"}):
        sel = (types == t) | (types == "good")
        rows.append(f"<tr><td>{html.escape(t)}</td><td>{int((types == t).sum())}</td>"
                    f"<td>{metrics.auroc(types[sel] != 'good', scores[sel]):.3f}</td>"
                    f"<td>{(scores[types == t] >= threshold).mean():.2f}</td></tr>")
    fp = (scores[~y] >= threshold).mean()
    return (f"<h2>Ground truth</h2><img alt='ROC curve' src='{figure_data_uri(fig)}'>"
            "<table><tr><th>defect type</th><th>images</th><th>image AUROC vs good</th>"
            f"<th>flagged at threshold</th></tr>{''.join(rows)}</table>"
            f"<p>good images flagged at threshold: {fp:.3f}</p>")


def _reviewed_section(con) -> str:
    """Precision of the `anomalous` verdict per night and line from reviewers' labels ('' without labels)."""
    rows = [r for r in run_query(con, "verdict_precision_per_night_and_line") if r["reviewed"]]
    if not rows:
        return ""
    items = "".join(f"<tr><td>{r['run_date']}</td><td>{html.escape(r['line'] or '-')}</td><td>{r['flagged']}</td>"
                    f"<td>{r['reviewed']}</td><td>{r['confirmed_defects']}</td><td>{r['false_alarms']}</td>"
                    f"<td>{r['precision']:.2f}</td></tr>" for r in rows)
    return ("<h2>Reviewed verdicts</h2><table><tr><th>night</th><th>line</th><th>flagged</th><th>reviewed</th>"
            f"<th>defects</th><th>false alarms</th><th>precision</th></tr>{items}</table>"
            "<p>precision = defects / reviewed flagged images (labels of `anomaly review`)</p>")


def calibration_reference(manifest: dict) -> dict:
    """A model's calibration in normalised units (0 = the mean held-out normal score, 1 = the threshold):
    the QUANTILES of its held-out normal scores where the manifest records them (stats.calibration_scores),
    else of a normal distribution with their mean and standard deviation (basis says which); their
    maximum, how many there were and the target false-alarm rate."""
    cal = manifest["calibration"]
    mean, span = cal["normal_mean"], cal["threshold"] - cal["normal_mean"]
    scores = (manifest.get("stats") or {}).get("calibration_scores")
    if scores:
        norm = (np.asarray(scores, dtype=np.float64) - mean) / span
        qs = {q: float(np.quantile(norm, float(q[1:]) / 100)) if q != "median" else float(np.median(norm))
              for q in QUANTILES}
        basis = "held-out scores"
    else:
        qs, basis = {q: z * cal["normal_std"] / span for q, z in QUANTILES.items()}, "normal fit"
    return {**qs, "max": (cal["normal_max"] - mean) / span, "images": cal["n_images"],
            "false_alarm_rate": cal.get("false_alarm_rate"), "basis": basis}


def night_drift(con, *, nights: int = DRIFT_NIGHTS, bound: float = DRIFT_BOUND) -> list[dict]:
    """Per night (and model) of the last `nights`: quantiles of score_normalised, the share flagged and
    whether the median drifted beyond `bound` (jobs/analyst.sql, night_drift)."""
    return run_query(con, "night_drift", nights=nights, bound=bound)


def drift_figure(rows: list[dict], *, reference: dict | None = None, bound: float = DRIFT_BOUND):
    """Box per night (p25-p75, whiskers p05-p95, median dot; red when drifted) in normalised units, the
    calibration's reference box first when given, the calibration mean (0), the threshold (1) and the
    band of +-bound around 0. Returns the matplotlib figure."""
    several = len({r["model_id"] for r in rows}) > 1
    boxes = ([("calibration", reference, False)] if reference else []) + [
        (f"{r['run_date']}" + (f"\n{r['model_id'][:6]}" if several else ""), r, r["drifted"]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(boxes) + 2), 3.2))
    ax.axhspan(-bound, bound, color="#2e7d32", alpha=0.08, label=f"median within +-{bound}")
    ax.axhline(0, color="#2e7d32", lw=1, label="calibration mean")
    ax.axhline(1, color="#c0392b", ls="--", lw=1, label="threshold")
    for i, (_, q, drifted) in enumerate(boxes):
        colour = "#c0392b" if drifted else ("#888888" if q is reference else "#4a78b0")
        ax.vlines(i, q["p05"], q["p95"], color=colour, lw=1)
        ax.bar(i, q["p75"] - q["p25"], bottom=q["p25"], width=0.5, color=colour, alpha=0.35, edgecolor=colour)
        ax.plot(i, q["median"], "o", color=colour, ms=5)
    ax.set_xticks(range(len(boxes)), [b[0] for b in boxes], rotation=45 if len(boxes) > 6 else 0, fontsize=8)
    ax.set_ylabel("normalised score")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def drift_html(rows: list[dict], *, reference: dict | None, figure_src: str, bound: float = DRIFT_BOUND) -> str:
    """The drift section: a plain sentence naming drifted nights, the figure, and the table."""
    drifted = [r for r in rows if r["drifted"]]
    verdict = (f"<p class='drift-flag'>DRIFT on {len(drifted)} of {len(rows)} nights: "
               + ", ".join(f"{r['run_date']} (median {r['median']:+.2f})" for r in drifted) + "</p>"
               if drifted else f"<p class='drift-ok'>No drift: every night's median is within +-{bound} of the "
               f"calibration mean ({len(rows)} nights).</p>")
    fmt = "".join(f"<td>{{{q}:+.2f}}</td>" for q in QUANTILES)
    body = []
    if reference:
        rate = reference["false_alarm_rate"]
        body.append(f"<tr class='reference'><td>calibration</td><td>{reference['images']} held-out</td>"
                    + fmt.format(**reference) + f"<td>{'' if rate is None else f'{rate:.1%} target'}</td>"
                    f"<td>{reference['basis']}</td></tr>")
    for r in rows:
        body.append(f"<tr class='{'drifted' if r['drifted'] else 'ok'}'><td>{r['run_date']}</td>"
                    f"<td>{r['images']} ({html.escape(r['model_id'][:8])})</td>" + fmt.format(**r)
                    + f"<td>{r['flagged_rate']:.1%}</td><td>{'DRIFT' if r['drifted'] else 'ok'}</td></tr>")
    head = "".join(f"<th>{q}</th>" for q in QUANTILES)
    return (f"<h2>Drift against the calibration</h2>{verdict}<img alt='drift' src='{figure_src}'>"
            f"<table class='drift'><tr><th>night</th><th>images (model)</th>{head}<th>flagged</th><th>flag</th></tr>"
            f"{''.join(body)}</table><p>Normalised scores: 0 = the model's mean held-out normal score, 1 = its "
            f"threshold. A night is flagged when its median lies beyond +-{bound}.</p>")


def _roc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="mergesort")
    tp = np.concatenate([[0], np.cumsum(y[order])]) / y.sum()
    fp = np.concatenate([[0], np.cumsum(~y[order])]) / (~y).sum()
    return fp, tp


def set_by_image_term(row: dict) -> bool:
    """Whether an output row's score is its image_term_score: the whole image, not a patch, set it."""
    term = row.get("image_term_score")
    return term is not None and not math.isnan(term) and term >= row["score"]


def write_show(image_path: str, model_dir: str, out_png: str, *, device: str = "auto") -> dict:
    """Score one image in-process (no Ray) and write image | overlay side by side as a PNG; the map is
    rebuilt from the row's stored grid, as report and analysts rebuild it."""
    from anomaly_core.decode import decode_batch
    from jobs.scorer import Scorer
    scorer = Scorer(model_path=model_dir, device=device)
    data = Path(image_path).read_bytes()
    batch = decode_batch({"path": np.array([image_path], dtype=object), "bytes": np.array([data], dtype=object)},
                         input_size=scorer.model.config.input_size)
    row = {k: v[0] for k, v in scorer(batch).items()}
    if row["status"] != "ok":
        raise ValueError(f"{image_path}: {row['error']}")
    image = decode_image(data)
    side = np.concatenate([image, row_overlay(image, row, threshold=float(row["threshold"]))], axis=1)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(side).save(out_png)
    return {"image": image_path, "score": float(row["score"]), "verdict": row["verdict"],
            "score_normalised": float(row["score_normalised"]), "peak": [int(row["peak_x"]), int(row["peak_y"])],
            "set_by_image_term": set_by_image_term(row), "overlay": out_png}


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}.grid{display:flex;flex-wrap:wrap;gap:1em}
.card{border:1px solid #ddd;padding:.5em;width:420px}.card img{width:200px;margin-right:4px}
code{font-size:.8em;word-break:break-all}.missing{color:#c0392b}.drift-flag,tr.drifted{color:#c0392b;font-weight:bold}
.drift-ok{color:#2e7d32}"""

_CHECK_JS = """window.addEventListener('load', function () {
  var broken = Array.prototype.filter.call(document.images,
                                           function (i) { return !i.complete || i.naturalWidth === 0; });
  document.body.setAttribute('data-broken-images', String(broken.length));
  document.body.setAttribute('data-images', String(document.images.length));
});"""
