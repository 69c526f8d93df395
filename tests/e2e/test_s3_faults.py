"""Object storage faults, against moto's standalone S3 server on 127.0.0.1.

A small fault-injecting HTTP proxy (`FaultProxy`) sits between raypose and moto: it answers
chosen requests with S3 errors (503 SlowDown, 500 InternalError, 403 AccessDenied, a wrong
access key) and forwards everything else. Covered:

- transient errors are retried with backoff (raypose's default S3 retry policy, `raypose.inputs.storage`),
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
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import job_dict, read_json, s3_bucket
from typer.testing import CliRunner

from raypose.cli import app

runner = CliRunner()

# Credentials moto accepts (it checks none) and that must never be written anywhere.
KEY = "AKIARAYPOSELEAKCHECK"
SECRET = "raypose+Secret/do-not-log-7f3a"
RENAMED = {"img_0000.jpg": "img_0000.jpg", "img_0001.jpg": "läufer 1.jpg", "img_0002.jpg": "img_0002.jpg"}
FAST_RETRIES = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2}}}


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


def upload_dataset(s3_server: str, bucket: str, coco_folder: Path) -> None:
    """The three drawn images (one renamed with a space and non-ASCII) and their COCO boxes, into a new bucket."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_bucket(s3_server, bucket, KEY, SECRET))
    for old, new in RENAMED.items():
        fs.pipe(f"{bucket}/coco/val/{new}", (coco_folder / "images" / old).read_bytes())
    coco = read_json(coco_folder / "boxes.json")
    for image in coco["images"]:
        image["file_name"] = RENAMED[image["file_name"]]
    fs.pipe(f"{bucket}/coco/annotations/boxes.json", json.dumps(coco).encode())


def s3_job(bucket: str, checkpoint, endpoint: str, *, output: str | None = None, **options) -> dict:
    storage_options = {"key": KEY, "secret": SECRET, "endpoint_url": endpoint,
                       "client_kwargs": {"region_name": "us-east-1"}, **options}
    spec = job_dict(f"s3://{bucket}/coco/val/", f"s3://{bucket}/coco/annotations/boxes.json", checkpoint,
                    output or f"s3://{bucket}/labels/run/", limits={"max_errored_fraction": 1.0})
    spec["images"]["storage_options"] = storage_options
    return spec


def s3fs_for(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=endpoint,
                             client_kwargs={"region_name": "us-east-1"}, skip_instance_cache=True)


def output_rows(fs, root: str) -> tuple[list[dict], list[dict]]:
    keypoints = pq.read_table(f"{root}/keypoints", filesystem=fs).to_pylist()
    errors = pq.read_table(f"{root}/errors", filesystem=fs).to_pylist()
    return keypoints, errors


def assert_no_credentials(*texts: str) -> None:
    for text in texts:
        assert KEY not in text and SECRET not in text


def written_text(fs, root: str) -> str:
    """Everything a job wrote as text: its JSON files as they are, its Parquet tables as rows."""
    parts = []
    for path in fs.find(root):
        if path.endswith(".json"):
            parts.append(fs.cat_file(path).decode())
        elif path.endswith(".parquet"):
            parts.append(str(pq.read_table(path, filesystem=fs).to_pylist()))
    return "\n".join(parts)


def ray_log_text() -> str:
    """The embedded Ray's own log files (drivers, workers, raylet), as far as they can be read."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return ""
    text = []
    for path in Path(node.get_session_dir_path(), "logs").rglob("*"):
        if path.is_file() and path.stat().st_size < 20_000_000:
            text.append(path.read_text(errors="replace"))
    return "\n".join(text)


def submit(job: Path, *args: str):
    return runner.invoke(app, ["submit", str(job), *args])


# --- the retry policy -----------------------------------------------------------------------


def test_transient_s3_errors_are_retried_and_the_job_loses_nothing(
    ray_session, s3_server, proxy, tiny_checkpoint, coco_folder, write_job, caplog
):
    upload_dataset(s3_server, "retry-ok", coco_folder)
    # No retry config in the job: raypose's default policy retries these.
    faults = [
        proxy.fail(503, "SlowDown", r"^/retry-ok$", methods=("GET",), query="list-type", times=1),
        proxy.fail(500, "InternalError", r"^/retry-ok/coco/annotations/boxes\.json$", times=1),
        proxy.fail(503, "SlowDown", r"^/retry-ok/coco/val/läufer 1\.jpg$", times=2),
        proxy.fail(500, "InternalError", r"^/retry-ok/coco/val/img_0002\.jpg$", times=2),
        proxy.fail(503, "ServiceUnavailable", r"^/retry-ok/labels/run/_tmp/[0-9a-f]{16}\.parquet\.part$", methods=("PUT",),
                   times=1),
    ]
    job = write_job(s3_job("retry-ok", tiny_checkpoint, proxy.endpoint))
    result = submit(job)
    assert result.exit_code == 0, result.output
    assert "3 images, 6 instances, 0 errors" in result.output
    assert [f.hits for f in faults] == [1, 1, 2, 2, 1]  # every fault was met, and got past
    assert proxy.requests_to(r"^/retry-ok/coco/val/img_0002\.jpg$")[-1][1] in (200, 206)

    fs = s3fs_for(s3_server)
    keypoints, errors = output_rows(fs, "retry-ok/labels/run")
    assert len(keypoints) == 6 and errors == []
    assert {r["image_key"] for r in keypoints} == set(RENAMED.values())
    assert read_json_s3(fs, "retry-ok/labels/run/manifest.json")["status"] == "succeeded"
    assert_no_credentials(result.output, caplog.text, written_text(fs, "retry-ok/labels/run"), ray_log_text())


def read_json_s3(fs, path: str) -> dict:
    return json.loads(fs.cat_file(path))


def test_an_object_that_keeps_failing_becomes_a_read_error_and_the_job_goes_on(
    ray_session, s3_server, proxy, tiny_checkpoint, coco_folder, write_job, caplog
):
    upload_dataset(s3_server, "retry-out", coco_folder)
    broken = proxy.fail(500, "InternalError", r"^/retry-out/coco/val/img_0002\.jpg$")  # always
    job = write_job(s3_job("retry-out", tiny_checkpoint, proxy.endpoint, **FAST_RETRIES))
    started = time.monotonic()
    result = submit(job)
    assert result.exit_code == 0, result.output
    assert "3 images, 3 instances, 1 errors" in result.output
    assert time.monotonic() - started < 120
    # The job's own retry policy (2 attempts) was used: each request to the key was tried twice.
    requests = proxy.requests_to(r"^/retry-out/coco/val/img_0002\.jpg$")
    assert broken.hits == len(requests) and len(requests) % 2 == 0 and len(requests) >= 2

    fs = s3fs_for(s3_server)
    keypoints, errors = output_rows(fs, "retry-out/labels/run")
    assert {r["image_key"] for r in keypoints} == {"img_0000.jpg", "läufer 1.jpg"} and len(keypoints) == 3
    [error] = errors
    assert (error["image_key"], error["instance_index"], error["stage"]) == ("img_0002.jpg", None, "read")
    assert error["image_uri"] == "s3://retry-out/coco/val/img_0002.jpg"
    assert error["reason"] == "cannot read: OSError: [Errno 121] Internal Server Error"
    assert_no_credentials(result.output, caplog.text, written_text(fs, "retry-out/labels/run"))


# --- fail fast, before Ray ------------------------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """Record any attempt to start Ray or run a job; the test checks there was none."""
    import ray

    import raypose.pipeline.run

    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("ray.init"))
    monkeypatch.setattr(raypose.pipeline.run, "run_job", lambda *a, **k: calls.append("run_job"))
    was_initialized = ray.is_initialized()
    yield calls
    assert ray.is_initialized() == was_initialized


def fail_fast_cases(bucket: str) -> dict[str, tuple[dict, str]]:
    """name -> (spec changes, the error line expected), for a dataset in `bucket`."""
    return {
        "missing images bucket": (
            {"images.path": "s3://no-such-bucket/coco/val/"},
            "error: images.path: s3://no-such-bucket/coco/val/ is not a directory, glob or manifest (.txt) that exists",
        ),
        "missing boxes object": (
            {"boxes.path": f"s3://{bucket}/coco/annotations/nope.json"},
            f"error: boxes.path: s3://{bucket}/coco/annotations/nope.json does not exist",
        ),
        "missing output bucket": (
            {"output.path": "s3://no-such-output-bucket/labels/"},
            "error: output.path: cannot write to s3://no-such-output-bucket/labels/: FileNotFoundError: "
            "The specified bucket does not exist",
        ),
        "read-only output": (
            {"output.path": "s3://read-only/labels/"},
            "error: output.path: cannot write to s3://read-only/labels/: PermissionError: ",
        ),
        "images bucket denied": (
            {"images.path": "s3://forbidden/coco/val/"},
            "error: images.path: permission denied listing s3://forbidden/coco/val/: ",
        ),
        "wrong credentials": (
            {"images.storage_options.key": "AKIAWRONGKEY"},
            f"error: output.path: cannot access s3://{bucket}/labels/run/: PermissionError: ",
        ),
    }


@pytest.mark.parametrize("case", list(fail_fast_cases("b")))
@pytest.mark.parametrize("command", ["validate", "submit"])
def test_storage_problems_fail_before_ray_starts_naming_the_url(
    command, case, s3_server, proxy, tiny_checkpoint, coco_folder, write_job, no_ray, caplog
):
    bucket = f"fast-{command}-{case.replace(' ', '-')}"
    upload_dataset(s3_server, bucket, coco_folder)
    if "read-only" not in _buckets(s3_server):
        s3_bucket(s3_server, "read-only", KEY, SECRET)
    proxy.fail(403, "AccessDenied", r"^/read-only/", methods=("PUT", "POST", "DELETE"))
    proxy.fail(403, "AccessDenied", r"^/forbidden(/|$)")
    proxy.require_key = KEY
    changes, expected = fail_fast_cases(bucket)[case]
    spec = s3_job(bucket, tiny_checkpoint, proxy.endpoint)
    overrides = [arg for key, value in changes.items() for arg in ("--set", f"{key}={value}")]

    started = time.monotonic()
    result = runner.invoke(app, [command, str(write_job(spec)), *overrides])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(expected), result.output
    assert time.monotonic() - started < 30  # no retrying what retrying cannot fix
    assert no_ray == []
    assert_no_credentials(result.output, caplog.text)
    assert "no-such" not in " ".join(_buckets(s3_server))  # and no bucket was created on the way


def _buckets(s3_server: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    return [b["Name"] for b in client.list_buckets()["Buckets"]]


# --- faults mid-job -------------------------------------------------------------------------


def test_images_deleted_after_planning_become_read_errors(ray_session, s3_server, tiny_checkpoint, coco_folder, caplog):
    from raypose.config.spec import parse_job_spec
    from raypose.pipeline.plan import plan_job
    from raypose.pipeline.run import run_job

    upload_dataset(s3_server, "vanishing-images", coco_folder)
    plan = plan_job(parse_job_spec(s3_job("vanishing-images", tiny_checkpoint, s3_server)), run=True)
    assert plan.counts["images"] == 3
    fs = s3fs_for(s3_server)
    fs.rm("vanishing-images/coco/val/läufer 1.jpg")  # gone between planning and reading
    result = run_job(plan)
    assert result.counts["instances"] == 5 and result.counts["errors"] == 1

    keypoints, errors = output_rows(fs, "vanishing-images/labels/run")
    assert {r["image_key"] for r in keypoints} == {"img_0000.jpg", "img_0002.jpg"}
    assert [(e["image_key"], e["instance_index"], e["stage"], e["reason"]) for e in errors] == [
        ("läufer 1.jpg", None, "read", "not found in storage")]
    assert_no_credentials(caplog.text, written_text(fs, "vanishing-images/labels/run"), ray_log_text())


def remove_bucket(fs, bucket: str, attempts: int = 20) -> None:
    """Delete a bucket and its objects, again while the job's write tasks still add parts to it."""
    for _ in range(attempts):
        try:
            fs.rm(bucket, recursive=True)
        except OSError:  # a part landed between the objects' delete and the bucket's: "not empty"
            time.sleep(0.1)
        fs.invalidate_cache()
        if not fs.exists(bucket):
            return
    raise AssertionError(f"{bucket} could not be removed in {attempts} attempts")


def test_an_output_bucket_that_vanishes_mid_job_fails_the_job_clearly(
    ray_session, s3_server, tiny_checkpoint, coco_folder, write_job, monkeypatch, caplog
):
    from raypose.output.writer import ShardWriter

    upload_dataset(s3_server, "job-inputs", coco_folder)
    s3_bucket(s3_server, "vanishing-output", KEY, SECRET)
    spec = s3_job("job-inputs", tiny_checkpoint, s3_server, output="s3://vanishing-output/labels/")
    spec["output"]["images_per_shard"] = 1
    spec["resources"] = {"images_per_crop_task": 1}
    fs = s3fs_for(s3_server)
    original = ShardWriter.take

    def take_after_the_bucket_went(self, summaries):
        if fs.exists("vanishing-output"):  # the first parts are reported to the driver: the bucket goes away
            remove_bucket(fs, "vanishing-output")
        return original(self, summaries)

    monkeypatch.setattr(ShardWriter, "take", take_after_the_bucket_went)
    started = time.monotonic()
    result = submit(write_job(spec))
    assert time.monotonic() - started < 120  # it does not hang
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: output.path: cannot write ") and "to s3://vanishing-output/labels/: " in last
    assert "FileNotFoundError: The specified bucket does not exist" in last
    assert "done:" not in result.output
    assert "vanishing-output" not in _buckets(s3_server)  # raypose did not create it again
    assert_no_credentials(result.output, caplog.text)
