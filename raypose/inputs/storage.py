"""Storage options as raypose hands them to fsspec: the job's own, plus a retry policy for S3.

botocore retries transient S3 failures itself (HTTP 500/502/503/504, throttling such as
`SlowDown`, timeouts, dropped connections), with jittered exponential backoff. Its default
("legacy" mode, 5 attempts) is made for interactive calls; a batch job that reads millions of
objects meets throttling storms, so for `s3://` raypose asks for AWS's `standard` mode with
more attempts, unless the job or the AWS configuration already says how to retry:

    storage_options: {config_kwargs: {retries: {total_max_attempts: 4, mode: adaptive}}}   # the job's own
    AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, or max_attempts / retry_mode in ~/.aws/config  # AWS's own

s3fs passes `config_kwargs` to `botocore.config.Config`; on top of botocore's retries s3fs
itself retries `SlowDown` errors a few times. Errors that retrying cannot fix (access
denied, no such bucket or key) are not retried.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs

from raypose.errors import RayposeError, SpecError
from raypose.inputs.names import on_disk

S3_PROTOCOLS = ("s3://", "s3a://")
# 10 attempts in all (botocore's `max_attempts` counts retries, `total_max_attempts` attempts);
# standard mode waits random(0, 1) * 2**n seconds (at most 20) before attempt n + 2.
DEFAULT_S3_RETRIES = {"mode": "standard", "total_max_attempts": 10}


def with_retries(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options to open `url` with: the job's, plus DEFAULT_S3_RETRIES for S3 when nothing else says how to retry."""
    options = dict(storage_options or {})
    if isinstance(options.get("config_kwargs"), dict):
        # botocore rewrites the retries dict it is given (max_attempts -> total_max_attempts): give it a
        # copy, so the job's spec (its fingerprint, what resume compares) stays as written.
        options["config_kwargs"] = copy.deepcopy(options["config_kwargs"])
    if not str(url).lower().startswith(S3_PROTOCOLS):
        return options
    config = options.get("config_kwargs") or {}
    if "retries" in config or _aws_configures_retries(options.get("profile")):
        return options
    options["config_kwargs"] = {**config, "retries": dict(DEFAULT_S3_RETRIES)}
    return options


def _aws_configures_retries(profile: str | None) -> bool:
    if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return True
    return _profile_configures_retries(profile, os.environ.get("AWS_PROFILE"), os.environ.get("AWS_CONFIG_FILE"))


@functools.lru_cache(maxsize=16)
def _profile_configures_retries(profile: str | None, *_environment: str | None) -> bool:
    """Whether the AWS config file sets max_attempts or retry_mode for the profile (read once per process)."""
    try:
        import botocore.session

        session = botocore.session.Session(profile=profile)
        return any(session.get_scoped_config().get(name) for name in ("max_attempts", "retry_mode"))
    except Exception:  # no botocore, an unknown profile: s3fs will say so when it connects
        return False


def open_url(url: str, storage_options: dict[str, Any] | None, field: str,
             error: type[RayposeError] = SpecError) -> tuple[Any, str]:
    """(filesystem, path) of a local path or fsspec URL, opened `with_retries`; an unusable URL is `error` naming `field`."""
    try:
        return url_to_fs(str(url), **with_retries(str(url), storage_options))
    except (ImportError, ValueError, TypeError) as exc:
        raise error(f"{field}: cannot open {url}: {exc}") from exc


def open_listed(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """(filesystem, path) of a URI the listing recorded, taken literally: no glob (`*?[`), no `::` chaining;
    a local name's `%XX` escapes read as the bytes they stand for where it is not on disk as written (`names.on_disk`)."""
    protocol = split_protocol(uri)[0] or "file"
    cls = fsspec.get_filesystem_class(protocol)
    fs = fsspec.filesystem(protocol, **{**cls._get_kwargs_from_urls(uri), **with_retries(uri, storage_options)})
    path = cls._strip_protocol(uri)
    return fs, on_disk(path) if protocol in ("file", "local") else path


def uri_of(fs, path: str) -> str:
    """A path on `fs` as the URI raypose records (local paths as file://...)."""
    return path if "://" in path else fs.unstrip_protocol(path)
