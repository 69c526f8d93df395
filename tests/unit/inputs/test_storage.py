"""Storage options as raypose hands them to fsspec: the S3 retry policy, URLs opened naming their field."""

from __future__ import annotations

import pytest

from raypose.inputs.storage import DEFAULT_S3_RETRIES, with_retries

KEY = "AKIARAYPOSELEAKCHECK"


def test_s3_urls_get_a_retry_policy_unless_one_is_configured(monkeypatch):
    for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    options = {"key": KEY, "config_kwargs": {"connect_timeout": 3}}
    assert with_retries("s3://b/x.jpg", options) == {
        "key": KEY, "config_kwargs": {"connect_timeout": 3, "retries": DEFAULT_S3_RETRIES}}
    assert options == {"key": KEY, "config_kwargs": {"connect_timeout": 3}}  # the job's options are not changed
    assert with_retries("S3A://b/x.jpg", {})["config_kwargs"]["retries"] == DEFAULT_S3_RETRIES
    assert with_retries("/local/x.jpg", options) == options and with_retries("gs://b/x", {}) == {}
    own = {"config_kwargs": {"retries": {"max_attempts": 2}}}
    given = with_retries("s3://b/x", own)
    assert given == own  # the job's own policy wins
    given["config_kwargs"]["retries"]["total_max_attempts"] = given["config_kwargs"]["retries"].pop("max_attempts")
    assert own == {"config_kwargs": {"retries": {"max_attempts": 2}}}  # botocore rewrites a copy, not the spec
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    assert with_retries("s3://b/x", {}) == {}  # and so does AWS's own configuration


# --- faults mid-job -------------------------------------------------------------------------


def test_open_url_names_the_field_and_uri_of_records_the_protocol(tmp_path):
    from raypose.errors import SpecError
    from raypose.inputs.storage import open_url, uri_of

    fs, path = open_url(str(tmp_path), {}, "images.path")
    assert uri_of(fs, path) == f"file://{tmp_path}" and uri_of(fs, "s3://b/k") == "s3://b/k"
    with pytest.raises(SpecError, match=r"^boxes.path: cannot open nosuchproto://x"):
        open_url("nosuchproto://x", {}, "boxes.path")
