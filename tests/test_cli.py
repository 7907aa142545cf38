"""The command line without Ray: options come from ModelConfig's fields, and every command ends a user's
mistake with `Error: <message>` and a non-zero status, no traceback unless -v."""

import dataclasses
import json
import logging
import typing

import click
import numpy as np
import pytest
from click.testing import CliRunner

from anomaly_core.config import ModelConfig, option
from jobs import console
from jobs.cli import _field_option, main


def run(*argv):
    return CliRunner().invoke(main, [str(a) for a in argv])


@pytest.mark.parametrize("argv, message", [
    (["fit", "{tmp}/no_images", "{tmp}/model"], "no_images not found"),
    (["score", "{tmp}/archive", "{tmp}/no_model", "{tmp}/out"], "no_model"),
    (["score", "--config", "{tmp}/no_audit.yaml"], "audit file {tmp}/no_audit.yaml not found"),
    (["evaluate", "{tmp}/no_dataset", "--out", "{tmp}/eval"], "train/good not found"),
    (["report", "{tmp}"], "no Parquet files under"),
    (["show", "{tmp}/no_image.png", "--model", "{tmp}/no_model"], "no_model is not a fitted model"),
    (["demo", "--out", "{tmp}/a_file/demo"], "a_file"),
])
def test_every_command_ends_a_mistake_with_its_message_and_no_traceback(tmp_path, argv, message):
    (tmp_path / "archive").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    result = run(*[a.format(tmp=tmp_path) for a in argv])
    assert result.exit_code == 1, result.output
    last = result.stderr.splitlines()[-1]                # after our log lines, if any
    assert last.startswith("Error: ") and message.format(tmp=tmp_path) in last, result.stderr
    assert "Traceback" not in result.output


def test_verbose_shows_the_traceback(tmp_path):
    result = run("report", tmp_path, "-v")
    assert result.exit_code == 1 and "Traceback" in result.stderr and "Error: no Parquet files" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--coreset-ratio", "0"], "coreset_ratio=0.0 must be in (0, 1]"),
    (["--blocks", "5,x"], "'5,x' must be comma-separated integers"),
    (["--reduction", "mean"], "'mean' is not one of 'max', 'smoothed_max', 'topk_mean'"),
    (["--nprobe", "many"], "'many' is not a valid integer"),
])
def test_a_bad_option_value_is_a_usage_error_that_names_it(tmp_path, argv, message):
    result = run("fit", tmp_path, tmp_path / "model", *argv)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_every_config_field_is_an_option_of_fit_and_evaluate():
    for command in ("fit", "evaluate"):
        names = {p.name for p in main.commands[command].params}
        assert {f.name for f in dataclasses.fields(ModelConfig)} <= names


def test_options_reach_the_config(tmp_path, monkeypatch):
    import jobs.fit
    seen = {}

    def fake_fit(data, model, *, config, **kw):
        seen["config"] = config
        return {"model_id": "m", "calibration": {"threshold": 1.0}, "stats": {}}
    monkeypatch.setattr(jobs.fit, "run_fit", fake_fit)
    result = run("fit", tmp_path, tmp_path / "model", "--blocks", "5,8", "--coreset-size", "100", "--index", "ivf",
                 "--nprobe", "4", "--coreset-oversample", "3", "--projection-dim", "64", "--foreground-mask")
    assert result.exit_code == 0, result.output
    assert seen["config"] == ModelConfig(blocks=(5, 8), coreset_size=100, index="ivf", nprobe=4,
                                         coreset_oversample=3.0, projection_dim=64, foreground_mask=True)
    run("fit", tmp_path, tmp_path / "model")
    assert seen["config"] == ModelConfig()                 # the defaults shown are the config's


def test_align_is_the_fits_choice_unless_a_flag_sets_it(tmp_path, monkeypatch):
    import jobs.fit
    seen = []
    monkeypatch.setattr(jobs.fit, "run_fit", lambda data, model, *, config, **kw: seen.append(config.align) or {
        "model_id": "m", "calibration": {"threshold": 1.0}, "stats": {}})
    for flags in ([], ["--align"], ["--no-align"]):
        assert run("fit", tmp_path, tmp_path / "model", *flags).exit_code == 0
    assert seen == [None, True, False]


def test_a_new_field_or_registry_name_needs_no_cli_change():
    registry = {"topk_mean": None, "max": None}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Later:
        false_alarm_rate: float | None = option(None, "Target false alarm rate.")
        reduction: str = option("topk_mean", "Image score.", choices=registry)
    registry["p99"] = None

    @click.command()
    def cmd(**kw):
        pass
    for f in dataclasses.fields(Later):
        cmd = _field_option(f, typing.get_type_hints(Later)[f.name])(cmd)
    params = {p.name: p for p in cmd.params}
    assert params["false_alarm_rate"].opts == ["--false-alarm-rate"] and params["false_alarm_rate"].default is None
    assert "p99" in params["reduction"].type.choices


def test_progress_without_a_terminal_is_plain_log_lines(monkeypatch, caplog):
    monkeypatch.setattr(console, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="jobs")
    line = console.Progress(total=4, label="score")
    line.update(3)
    line.close()
    assert line.bar is None                              # pytest's stderr is no terminal
    messages = [r.getMessage() for r in caplog.records if r.name == "jobs.console"]
    assert messages[0].startswith("score: 3/4 images") and "ETA" in messages[0]


def test_score_pins_the_model_and_takes_storage_limits_from_the_line_or_the_audit_file(tmp_path, monkeypatch):
    import jobs.score
    seen = {}
    monkeypatch.setattr(jobs.score, "run_score", lambda data, model, out, **kw: seen.update(kw) or {})
    result = run("score", "a", "m", "o", "--model-id", "3f0c9a1b2c3d4e5f", "--shared-fs", "--request-timeout", "5")
    assert result.exit_code == 0, result.output
    assert (seen["model_id"], seen["shared_fs"], seen["options"].request_timeout_s) == ("3f0c9a1b2c3d4e5f", True, 5)
    audit = tmp_path / "audit.yaml"
    audit.write_text('model: m\nmodel_id: "3f0c9a1b2c3d4e5f"\narchive: a\noutput: o\n'
                     'storage: {connect_timeout_s: 3}\nray: {shared_fs: true}\n')
    seen.clear()
    assert run("score", "--config", audit, "--request-timeout", "7").exit_code == 0
    assert (seen["model_id"], seen["shared_fs"]) == ("3f0c9a1b2c3d4e5f", True)
    assert (seen["options"].connect_timeout_s, seen["options"].request_timeout_s) == (3, 7)
    result = run("score", "a", "m", "o", "--request-timeout", "0")
    assert result.exit_code == 2 and "request_timeout_s=0.0 must be" in result.stderr


def test_score_and_fit_take_the_parquet_columns_from_the_line_or_the_audit_file(tmp_path, monkeypatch):
    import jobs.fit
    import jobs.score
    seen = {}
    monkeypatch.setattr(jobs.score, "run_score", lambda data, model, out, **kw: seen.update(kw) or {})
    monkeypatch.setattr(jobs.fit, "run_fit", lambda data, model, **kw: seen.update(kw) or {
        "stats": {}, "model_id": "0" * 16, "calibration": {"threshold": 0.5}})
    assert run("score", "a.parquet", "m", "o", "--image-column", "png", "--id-column", "name").exit_code == 0
    assert (seen["image_column"], seen["id_column"]) == ("png", "name")
    audit = tmp_path / "audit.yaml"
    audit.write_text("model: m\narchive: s3://b/{date}/shard-{000..009}.tar\noutput: o\ndate: 2026-11-30\n"
                     "input: {image_column: jpg}\n")
    seen.clear()
    assert run("score", "--config", audit).exit_code == 0
    assert (seen["image_column"], seen["id_column"]) == ("jpg", None)
    seen.clear()
    assert run("fit", "a.parquet", "m", "--image-column", "img").exit_code == 0
    assert (seen["image_column"], seen["id_column"]) == ("img", None)


def test_pack_prints_the_brace_range_of_the_shards_it_wrote(tmp_path):
    from tests.helpers import png_bytes
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.png").write_bytes(png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)))
    result = run("pack", tmp_path / "in", tmp_path / "out", "--shard-size", "2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"shards": f"{tmp_path}/out/shard-{{000000..000001}}.tar", "count": 2,
                                         "images": 3, "missing": 0}
    assert run("pack", tmp_path / "in", tmp_path / "out2", "--shard-size", "0").exit_code == 2
