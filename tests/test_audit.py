"""Audit files (jobs/audit.py): what they accept, what they refuse and how they say so."""

import datetime as dt

import pytest

from jobs.audit import load_audit, resolve_date


def write(tmp_path, text):
    f = tmp_path / "audit.yaml"
    f.write_text(text)
    return f


def test_a_full_file_sets_every_field(tmp_path):
    a = load_audit(write(tmp_path, """
model: /models/m
model_id: "3f0c9a1b2c3d4e5f"
archive: s3://archive/{date}/line-3/
output: s3://audits/x
date: 2026-11-21
resources: {batch_size: 4, actors: 2, device: cpu, rows_per_file: 8}
storage: {endpoint_url: "http://127.0.0.1:9000", region: eu-west-1, anonymous: true, connect_timeout_s: 5,
          request_timeout_s: 30}
ray: {address: "127.0.0.1:6379", shared_fs: true}
input: {image_column: png, id_column: part_id}
"""))
    assert (a.batch_size, a.actors, a.device, a.rows_per_file, a.address) == (4, 2, "cpu", 8, "127.0.0.1:6379")
    assert (a.storage.endpoint_url, a.storage.region) == ("http://127.0.0.1:9000", "eu-west-1")
    assert (a.storage.connect_timeout_s, a.storage.request_timeout_s) == (5, 30)
    assert a.storage.anonymous is True and a.shared_fs is True and a.model_id == "3f0c9a1b2c3d4e5f"
    assert a.date == "2026-11-21" and a.archive_for(a.date) == "s3://archive/2026-11-21/line-3/"
    assert (a.image_column, a.id_column) == ("png", "part_id")


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
    a = load_audit(write(tmp_path, "model: m\narchive: a\noutput: o\n"))
    assert (a.date, a.batch_size, a.actors, a.rows_per_file) == (None, 16, None, 1024)
    assert a.storage.endpoint_url is None and (a.model_id, a.shared_fs) == (None, False)
    assert (a.image_column, a.id_column) == ("image", None)
    assert (a.storage.connect_timeout_s, a.storage.request_timeout_s) == (10, 60)


@pytest.mark.parametrize("text, message", [
    ("model: m\narchive: a\noutput: o\nresorces: {}\n", r"unknown key\(s\) \['resorces'\]; valid keys"),
    ("model: m\narchive: a\noutput: o\nresources: {batchsize: 4}\n",
     r"\[resources\]: unknown key\(s\) \['batchsize'\]"),
    ("model: m\noutput: o\n", r"missing required key\(s\) \['archive'\]"),
    ("model: m\narchive: a\noutput: o\ndate: last week\n", "must be YYYY-MM-DD"),
    ("model: m\narchive: a\noutput: o\nstorage: {endpoint_url: 'localhost:9000'}\n", "must start with http"),
    ("- a list\n", "expected a mapping"),
    ("model: m\nmodel_id: ../../x\narchive: a\noutput: o\n", r"model id '../../x' is not 16 lower-case hex"),
    ("model: m\narchive: a\noutput: o\nray: {shared_fs: maybe}\n", "shared_fs must be true or false"),
    ("model: m\narchive: a\noutput: o\nstorage: {request_timeout_s: 0}\n", r"request_timeout_s=0 must be"),
])
def test_mistakes_name_the_file_and_the_fix(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as e:
        load_audit(write(tmp_path, text))
    assert "audit.yaml" in str(e.value)


def test_relative_dates_resolve_against_utc_today():
    today = dt.date(2026, 3, 1)
    assert resolve_date("yesterday", today=today) == "2026-02-28"
    assert resolve_date(None, today=today) == resolve_date("today", today=today) == "2026-03-01"
    assert resolve_date("2026-11-22") == "2026-11-22"
