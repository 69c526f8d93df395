"""Object storage faults, against moto's standalone S3 server on 127.0.0.1.

A small fault-injecting HTTP proxy (`FaultProxy`) sits between raypose and moto: it answers
chosen requests with S3 errors (503 SlowDown, 500 InternalError, 403 AccessDenied, a wrong
access key) and forwards everything else. Covered:

- transient errors are retried with backoff (raypose's default S3 retry policy, `raypose.storage`),
  on listing, boxes, image reads and output writes, and the job loses nothing;
- an object that keeps failing past the job's own retry config becomes a `read` error row;
- missing buckets and objects, wrong credentials and denied writes fail before Ray starts,
  naming the URL (exit 2);
- objects deleted after planning become `read` errors; an output bucket that vanishes mid-job
  fails the job clearly (exit 1, naming the output) and is not re-created;
- no credential from storage_options reaches the logs, the CLI output, the manifest,
  `_job.json`, the shard markers or the error reasons.
"""

from __future__ import annotations

import http.client
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from raypose.inputs.storage import DEFAULT_S3_RETRIES, with_retries

runner = CliRunner()

# Credentials moto accepts (it checks none) and that must never be written anywhere.
KEY = "AKIARAYPOSELEAKCHECK"


# --- the fault-injecting proxy --------------------------------------------------------------


@dataclass
class Fault:
    """Answer requests whose method and (decoded) path match with an S3 error, `times` times (None: always)."""

    status: int
    code: str
    path: str  # regex searched in the decoded path, e.g. r"^/bucket/key\.jpg$"
    methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "POST", "DELETE")
    query: str | None = None  # a substring the query must hold (e.g. "list-type")
    times: int | None = None
    hits: int = 0

    def matches(self, method: str, path: str, query: str) -> bool:
        return (
            method in self.methods
            and re.search(self.path, path) is not None
            and (self.query is None or self.query in query)
            and (self.times is None or self.hits < self.times)
        )


@dataclass
class FaultProxy:
    """An HTTP proxy in front of an S3 endpoint that injects faults; `endpoint` is its URL."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    require_key: str | None = None  # answer 403 InvalidAccessKeyId to requests signed with another key
    log: list[tuple[str, str, int]] = field(default_factory=list)  # (method, decoded path, status)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, status: int, code: str, path: str, **kwargs) -> Fault:
        fault = Fault(status, code, path, **kwargs)
        self.faults.append(fault)
        return fault

    def requests_to(self, path: str) -> list[tuple[str, int]]:
        with self.lock:
            return [(m, s) for m, p, s in self.log if re.search(path, p)]

    def start(self) -> "FaultProxy":
        proxy, upstream = self, urllib.parse.urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self._body()
                split = urllib.parse.urlsplit(self.path)
                path = urllib.parse.unquote(split.path)
                error = proxy._fault_for(self.command, path, split.query, self.headers.get("Authorization", ""))
                if error is not None:
                    status, code = error
                    self._error(status, code, path)
                else:
                    status = self._forward(body, upstream)
                with proxy.lock:
                    proxy.log.append((self.command, path, status))

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if not size:
                            break
                        data += chunk
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str, path: str) -> None:
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>injected by the test proxy</Message><Resource>{path}</Resource>"
                    "<RequestId>fault-proxy</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("x-amz-request-id", "fault-proxy")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes, upstream) -> int:
                skip = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "proxy-connection"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                headers["Content-Length"] = str(len(body))
                connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in skip:
                            self.send_header(name, value)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return response.status
                finally:
                    connection.close()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault_for(self, method: str, path: str, query: str, authorization: str) -> tuple[int, str] | None:
        if self.require_key is not None and f"Credential={self.require_key}/" not in authorization:
            return 403, "InvalidAccessKeyId"
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path, query):
                    fault.hits += 1
                    return fault.status, fault.code
        return None


@pytest.fixture
def proxy(s3_server):
    proxy = FaultProxy(s3_server).start()
    yield proxy
    proxy.stop()


# --- helpers --------------------------------------------------------------------------------


# --- the retry policy -----------------------------------------------------------------------


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


# --- fail fast, before Ray ------------------------------------------------------------------


# --- faults mid-job -------------------------------------------------------------------------




def test_open_url_names_the_field_and_uri_of_records_the_protocol(tmp_path):
    from raypose.errors import SpecError
    from raypose.inputs.storage import open_url, uri_of

    fs, path = open_url(str(tmp_path), {}, "images.path")
    assert uri_of(fs, path) == f"file://{tmp_path}" and uri_of(fs, "s3://b/k") == "s3://b/k"
    with pytest.raises(SpecError, match=r"^boxes.path: cannot open nosuchproto://x"):
        open_url("nosuchproto://x", {}, "boxes.path")
