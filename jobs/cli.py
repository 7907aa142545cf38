"""`anomaly` command line: fit, update, score, evaluate, report, show, export, pack, demo.

Without --address (or $RAY_ADDRESS) each command starts Ray in this process; with it, the work runs on
that cluster. `python -m jobs <command>` runs the same commands (what `ray job submit` runs).
"""

from __future__ import annotations

import dataclasses
import json
import traceback
import typing

import click

from anomaly_core.artifact import ModelFileError
from anomaly_core.config import ModelConfig
from anomaly_core.storage import StorageOptions
from jobs import console

# Mistakes a user can fix (a bad value, a missing or existing path, a model folder that is not one,
# storage access denied: OSError covers FileNotFoundError, FileExistsError, PermissionError, StorageError):
# they end a command with their message and exit status 1; a traceback only with -v.
USER_ERRORS = (ValueError, OSError, ModelFileError)


class IntList(click.ParamType):
    """A tuple of ints typed as a comma-separated list, e.g. --blocks 5,8."""
    name = "INTS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} must be comma-separated integers, e.g. 7 or 5,8", param, ctx)


def _field_option(field: dataclasses.Field, hint) -> typing.Callable:
    """`--field-name` for one ModelConfig field: its type, default, choices and help from the field."""
    flag = "--" + field.name.replace("_", "-")
    text = field.metadata.get("help", "")
    args = typing.get_args(hint)
    if type(None) in args:                                  # X | None: an option that defaults to None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", field.name, default=field.default, show_default=True,
                            help=text)
    default = field.default
    if "choices" in field.metadata:
        kind = click.Choice(sorted(field.metadata["choices"]))
    elif typing.get_origin(hint) is typing.Literal:
        kind = click.Choice(typing.get_args(hint))
    elif typing.get_origin(hint) is tuple and typing.get_args(hint) == (int, ...):
        kind, default = IntList(), ",".join(map(str, default))
    elif hint in (int, float, str):
        kind = hint
    else:
        raise TypeError(f"ModelConfig.{field.name}: no command-line option for type {hint}; use bool, int, "
                        f"float, str, tuple[int, ...], a Literal, or one of them | None")
    return click.option(flag, field.name, type=kind, default=default, show_default=default is not None,
                        help=text)


MODEL_OPTIONS = [_field_option(f, typing.get_type_hints(ModelConfig)[f.name])
                 for f in dataclasses.fields(ModelConfig)]


def _model_options(f):
    """One option per ModelConfig field, in the dataclass's order."""
    for o in reversed(MODEL_OPTIONS):
        f = o(f)
    return f


VERBOSE = click.option("-v", "--verbose", is_flag=True,
                       help="Debug logging, tracebacks, and Ray's own output here; without it Ray's output goes "
                            "to $TMPDIR/anomaly-<command>.log.")


def _run_options(f):
    opts = [
        click.option("--batch-size", type=int, default=16, show_default=True, help="Images per batch."),
        click.option("--actors", type=int, default=None,
                     help="Feature/scoring actors (default: one per GPU, else one per 4 CPUs)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--address", default=None, envvar="RAY_ADDRESS",
                     help="Ray cluster address (default: $RAY_ADDRESS, else start Ray in-process)."),
        VERBOSE,
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
        click.option("--connect-timeout", "connect_timeout_s", type=float, default=10.0, show_default=True,
                     help="Seconds to open a connection to S3 before the attempt fails."),
        click.option("--request-timeout", "request_timeout_s", type=float, default=60.0, show_default=True,
                     help="Seconds an S3 request may go without receiving a byte before the attempt fails "
                          "(5 attempts, so a hung server stops the job in about 5 minutes)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


STORAGE_KEYS = ("endpoint_url", "region", "anonymous", "connect_timeout_s", "request_timeout_s")


def _shard_options(f):
    opts = [
        click.option("--image-column", default="image", show_default=True,
                     help="Parquet shards: the image column, a struct with 'bytes' (Hugging Face's Image) or "
                          "binary."),
        click.option("--id-column", default=None,
                     help="Parquet shards: a column of unique image ids; images are then named FILE#ID "
                          "(default: FILE#row=I)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


SHARED_FS = click.option("--shared-fs", is_flag=True,
                         help="Local paths are on a file system every Ray node mounts at the same path (without "
                              "it, local paths are refused on a cluster of more than one node: use s3://).")


def _storage(kw: dict) -> StorageOptions:
    try:
        return StorageOptions(**{k: kw.pop(k) for k in STORAGE_KEYS})
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _config(kw: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: kw.pop(k) for k in list(kw) if k in names})
    except ValueError as e:
        raise click.UsageError(str(e)) from None


class Command(click.Command):
    """Every command: logging set up for its -v (jobs/console.py), and USER_ERRORS ended cleanly.
    uses_ray: the command starts Ray, whose output goes to the log file unless -v."""

    def __init__(self, *args, uses_ray: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.uses_ray = uses_ray

    def invoke(self, ctx: click.Context):
        verbose = bool(ctx.params.get("verbose"))
        with console.session(ctx.info_name, verbose=verbose, engine=self.uses_ray):
            try:
                return super().invoke(ctx)
            except USER_ERRORS as e:
                if verbose:
                    traceback.print_exc(file=console.terminal)
                raise click.ClickException(str(e) or type(e).__name__) from e


class Group(click.Group):
    command_class = Command


@click.group(cls=Group)
def main() -> None:
    """Visual anomaly detection for image archives: DINOv2 patch features + PatchCore memory bank on Ray."""


@main.command(uses_ray=True)
@click.argument("data")
@click.argument("model")
@_model_options
@_run_options
@_storage_options
@click.option("--overwrite", is_flag=True, help="Replace an existing model.")
@SHARED_FS
@_shard_options
@click.option("--memory-budget-mb", type=click.IntRange(min=80), default=None,
              help="Object-store memory for patch features when Ray starts in-process (the rest spills to "
                   "disk; the driver holds only coreset survivors). Default: Ray's, 30% of RAM.")
def fit(data, model, verbose, overwrite, **kw):
    """Learn normal appearance from the good images in DATA (folder, s3:// prefix or .txt manifest of
    image URIs, or shards: .tar/.parquet files, a brace range shard-{000000..000099}.tar, a prefix or a
    manifest of them); write the model to MODEL (folder or s3:// prefix)."""
    from jobs.fit import run_fit
    options = _storage(kw)
    config = _config(kw)
    manifest = run_fit(data, model, config=config, overwrite=overwrite, options=options, **kw)
    stats = {k: v for k, v in manifest["stats"].items()
             if k not in ("calibration_images", "calibration_scores", "unreadable")}
    click.echo(json.dumps({"model": model, "model_id": manifest["model_id"],
                           "threshold": manifest["calibration"]["threshold"], **stats}))


@main.command(uses_ray=True)
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
@click.option("--heatmap-png", is_flag=True,
              help="Also store each heatmap as an 8-bit PNG (heatmap_png): rows about 20x larger than with "
                   "the stored grid alone, and PNG encoding on the workers.")
@click.option("--model-id", default=None,
              help="The id MODEL must have (as `anomaly fit` printed it); any other model there is refused "
                   "before its files are read. Pin it for audits of a model in a shared bucket.")
@SHARED_FS
@_shard_options
@click.pass_context
def score(ctx, data, model, out, config_file, verbose, **kw):
    """Score every image in DATA with MODEL; write Parquet rows to OUT (folders or s3:// URIs). DATA is
    what `anomaly fit` takes: images or shards (one output file per shard, resumed by shard).
    Prints the run summary as one JSON line."""
    from jobs.score import run_score
    if config_file:
        if data or model or out:
            raise click.UsageError("give either --config or DATA MODEL OUT, not both")
        from jobs.audit import load_audit, resolve_date
        audit = load_audit(config_file)
        typed = {k for k in kw if ctx.get_parameter_source(k) in (click.core.ParameterSource.COMMANDLINE,
                                                                  click.core.ParameterSource.ENVIRONMENT)}
        try:
            options = dataclasses.replace(audit.storage, **{k: kw[k] for k in STORAGE_KEYS if k in typed})
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        for k in STORAGE_KEYS:
            kw.pop(k)
        for key in ("batch_size", "actors", "device", "address", "rows_per_file", "model_id", "shared_fs",
                    "image_column", "id_column"):
            if key not in typed:
                kw[key] = getattr(audit, key)
        kw["run_date"] = resolve_date(kw["run_date"] or audit.date)
        data, model, out = audit.archive_for(kw["run_date"]), audit.model, audit.output
    else:
        if not (data and model and out):
            raise click.UsageError("give DATA MODEL OUT, or --config audit.yaml")
        options = _storage(kw)
    click.echo(json.dumps(run_score(data, model, out, options=options, **kw)))


@main.command(uses_ray=True)
@click.argument("dataset")
@click.option("--out", required=True, help="Folder for the model, the scores and metrics.json.")
@_model_options
@_run_options
def evaluate(dataset, out, verbose, **kw):
    """Fit on DATASET/train/good, score DATASET/test, write OUT/metrics.json (MVTec AD layout)."""
    from jobs.evaluate import run_evaluate
    result = run_evaluate(dataset, out, config=_config(kw), **kw)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))


@main.command()
@click.argument("scores_dir")
@click.option("--html", "html_path", default=None, help="Report file (default: SCORES_DIR/../report.html).")
@click.option("--top", type=int, default=12, show_default=True, help="Anomalies shown with their heatmaps.")
@click.option("--model", default=None, help="The model that scored SCORES_DIR: its calibration beside the drift.")
@_shard_options
@VERBOSE
def report(scores_dir, html_path, top, model, verbose, image_column, id_column):
    """Write a self-contained HTML report (counts, score histogram, worst images with heatmaps, errors)."""
    from pathlib import Path

    from anomaly_core.artifact import read_manifest
    from jobs.report import write_report
    html_path = html_path or str(Path(scores_dir).resolve().parent / "report.html")
    click.echo(str(write_report(scores_dir, html_path, top=top, manifest=read_manifest(model) if model else None,
                                image_column=image_column, id_column=id_column)))


@main.command()
@click.argument("image")
@click.option("--model", "model_dir", required=True, help="Fitted model directory.")
@click.option("--out", default=None, help="Overlay PNG (default: IMAGE_STEM_overlay.png here).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@VERBOSE
def show(image, model_dir, out, device, verbose):
    """Score one image (no Ray) and write it beside its heatmap overlay, for checking a single part."""
    from pathlib import Path

    from jobs.report import write_show
    out = out or f"{Path(image).stem}_overlay.png"
    click.echo(json.dumps(write_show(image, model_dir, out, device=device)))


@main.command()
@click.argument("out")
@click.option("--model", default=None, help="The model that scored OUT: its calibration is shown beside the drift.")
@click.option("--port", type=click.IntRange(0, 65535), default=8050, show_default=True, help="0: any free port.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; another than 127.0.0.1 lets other machines label (the page has no login).")
@click.option("--reviewer", default=None, help="Name stored with your labels (default: $ANOMALY_REVIEWER).")
@_storage_options
@_shard_options
@VERBOSE
def review(out, model, port, host, reviewer, verbose, **kw):
    """Serve a page to review and label the scored images in OUT (docs/review.md); labels go to OUT/_labels."""
    from jobs.labels import reviewer_name
    from jobs.review import serve
    serve(out, model=model, host=host, port=port, reviewer=reviewer_name(reviewer), options=_storage(kw), **kw)


@main.command()
@click.argument("model_dir", metavar="MODEL")
@click.argument("out", metavar="OUT.onnx")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset of the graph (14 or later).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of the backbone and the bank in the graph (input and outputs stay uint8/float32).")
@_storage_options
@VERBOSE
def export(model_dir, out, opset, dtype, verbose, **kw):
    """Write MODEL (folder or s3:// prefix) as one ONNX graph: image [N, S, S, 3] uint8 RGB resized with
    resize_square -> score [N], grid [N, G, G], map [N, S, S] float32; threshold and model id in its
    metadata (docs/export.md). Options the graph cannot express (align, foreground mask, ivfpq) are refused."""
    from anomaly_core.export import export_model
    from anomaly_core.model import Model
    result = export_model(Model.load(model_dir, _storage(kw)), out, opset=opset, dtype=dtype)
    click.echo(json.dumps({"onnx": result.path, "external_data": result.external_data, "bytes": result.bytes,
                           "bank_size": result.bank_size, **result.metadata}))


@main.command(uses_ray=True)
@click.argument("model")
@click.argument("paths", nargs=-1, metavar="[GOOD_IMAGES] NEW_MODEL")
@click.option("--from-labels", "from_labels", metavar="OUT", default=None,
              help="Take the images labelled normal in the scored output OUT instead of GOOD_IMAGES.")
@click.option("--max-added", type=click.IntRange(min=0), default=None,
              help="Most vectors added to the bank (default: coreset ratio x the new patches beyond half the "
                   "model's cover radius).")
@_run_options
@_storage_options
@click.option("--overwrite", is_flag=True, help="Replace an existing model at NEW_MODEL.")
@SHARED_FS
@_shard_options
def update(model, paths, from_labels, verbose, **kw):
    """Write NEW_MODEL: MODEL with what the good images in GOOD_IMAGES (what `anomaly fit` takes: images
    or shards), or those labelled normal in OUT, add to its bank, and its threshold recalibrated. MODEL
    is not modified and its training images are not read again."""
    from jobs.update import run_update, update_arguments
    options = _storage(kw)
    data, new_model = update_arguments(paths, from_labels=from_labels)
    manifest = run_update(model, data, new_model, from_labels=from_labels, options=options, **kw)
    click.echo(json.dumps({"model": new_model, "model_id": manifest["model_id"], "parent": manifest["parent"],
                           "threshold": manifest["calibration"]["threshold"],
                           **{k: v for k, v in manifest["added"].items() if k != "images"}}))


@main.command()
@click.argument("images")
@click.argument("out")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Images per tar shard.")
@_storage_options
@VERBOSE
def pack(images, out, shard_size, verbose, **kw):
    """Pack the images in IMAGES (folder, s3:// prefix or .txt manifest) into tar shards OUT/shard-NNNNNN.tar
    (WebDataset layout, members named by their path below IMAGES); prints the brace range naming them."""
    from jobs.pack import run_pack
    click.echo(json.dumps(run_pack(images, out, shard_size=shard_size, options=_storage(kw))))


@main.command(uses_ray=True)
@click.option("--out", default="demo_out", show_default=True, help="Folder for the demo's images and results.")
@_run_options
def demo(out, verbose, **kw):
    """Fit and score a small archive of real texture photographs (scikit-image) with drawn defects."""
    from jobs.demo import run_demo
    click.echo(json.dumps(run_demo(out, **kw), indent=2))
