"""`raypose submit --address`: the Ray Jobs API against a real local head, and the pieces around it.

The head is a `ray start --head --block` subprocess with its own ports, its own temp dir (so
its address file does not make anyone's `ray.init()` join it) and its own token; it is
stopped by signalling that process, never with `ray stop`, which would also end the session's
in-process Ray (the `ray_session` fixture) and anyone else's.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import job_dict, read_json
from raypose import cluster
from raypose.cli import app
from raypose.errors import SpecError

runner = CliRunner()
HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _our_pids(marker: str) -> list[int]:
    """Processes whose command line names our head's private temp dir (nobody else's can)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head with the dashboard and Jobs API on 127.0.0.1, token auth on; yields its address."""
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing is not None:
        pytest.skip(f"the Ray dashboard (Jobs API) needs ray[default]: {missing}")
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    temp_dir = tempfile.mkdtemp(prefix="rp-head-", dir="/tmp")  # short: Unix socket paths are limited
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    dashboard_port = free_port()
    args = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        f"--port={free_port()}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
        "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        from ray.job_submission import JobSubmissionClient

        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
                break
            except Exception as exc:  # not up yet
                if time.monotonic() > deadline:
                    pytest.fail(f"the Jobs API at {address} did not come up in {HEAD_START_TIMEOUT_S} s: {exc}\n"
                                f"{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield SimpleNamespace(address=address, token=token, temp_dir=temp_dir,
                              client=JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}))
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _our_pids(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _our_pids(temp_dir):  # stragglers of this head only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def head_env(ray_head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return ray_head


def wait_for(client, submission_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in cluster.TERMINAL:
            return status
        assert time.monotonic() < deadline, f"{submission_id} still {status}"
        time.sleep(1)


# --- against the real head ----------------------------------------------------------------


def test_submit_runs_on_the_head_streams_its_log_and_writes_parquet(head_env, tiny_checkpoint, coco_folder,
                                                                     write_job, tmp_path):
    output = tmp_path / "out"
    job = write_job(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, output))
    started = time.monotonic()
    result = runner.invoke(app, ["submit", str(job), "--address", head_env.address, "--set", "pose.batch_size=2"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # The job's own log, streamed: Ray's job manager line, then the run's lines, then its summary.
    [entry] = [line for line in lines if line.startswith("Running entrypoint for job ")]
    submission_id = entry.split()[4].rstrip(":")
    assert entry.endswith("python -m raypose.cli submit raypose-job.json")
    assert any(f"job {submission_id} started" in line for line in lines), result.stdout
    assert lines[-1].startswith("done: 3 images, 6 instances, 0 errors") and str(output) in lines[-1]

    table = pq.read_table(output / "keypoints")
    assert table.num_rows == 6
    assert set(table.column("job_id").to_pylist()) == {submission_id}  # one id in the dashboard and the table
    manifest = read_json(output / "manifest.json")
    assert manifest["job_id"] == submission_id and manifest["status"] == "succeeded"
    assert manifest["spec"]["pose"]["batch_size"] == 2  # --set travelled with the spec

    info = head_env.client.get_job_info(submission_id)
    assert str(info.status.value) == "SUCCEEDED" and info.metadata["raypose_name"] == "test-job"
    assert any(m.startswith("gcs://") for m in info.runtime_env["py_modules"])  # the package was uploaded
    assert head_env.token not in json.dumps(info.runtime_env) + info.entrypoint
    print(f"submit --address: {elapsed:.1f} s")


def test_a_spec_problem_found_on_the_cluster_exits_2(head_env, tiny_checkpoint, coco_folder, write_job, tmp_path):
    # Valid fields, so the local check passes; the images exist nowhere, which only the cluster finds out.
    job = write_job(job_dict(tmp_path / "no-such-images", coco_folder / "boxes.json", tiny_checkpoint,
                             tmp_path / "out"))
    env = {**os.environ, "RAY_AUTH_TOKEN": head_env.token}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "raypose.cli", "submit", str(job), "--address", head_env.address, "--quiet"],
        env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""  # --quiet: no log lines, and no summary for a job that did not run
    assert "error: images.path:" in done.stderr and "no-such-images" in done.stderr
    assert "FAILED" in done.stderr  # the client's own last word, as a warning-level line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_no_wait_prints_the_job_id_and_returns(head_env, tiny_checkpoint, coco_folder, write_job, tmp_path):
    job = write_job(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "out"))
    started = time.monotonic()
    result = runner.invoke(app, ["submit", str(job), "--address", head_env.address, "--no-wait"])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 30
    submission_id = result.stdout.strip()
    assert submission_id.startswith("test-job-") and "\n" not in submission_id
    info = head_env.client.get_job_info(submission_id)
    assert info.entrypoint == "python -m raypose.cli submit raypose-job.json"
    head_env.client.stop_job(submission_id)  # no need to run it twice; frees the head
    assert wait_for(head_env.client, submission_id) in ("STOPPED", "SUCCEEDED", "FAILED")


def test_a_wrong_token_is_refused_with_one_line(head_env, tiny_checkpoint, coco_folder, write_job, tmp_path,
                                                monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    job = write_job(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "out"))
    result = runner.invoke(app, ["submit", str(job), "--address", head_env.address])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: --address {head_env.address}: cannot use the Ray Jobs API there")
    assert "0" * 64 not in result.output


# --- without a cluster ----------------------------------------------------------------------


@pytest.fixture
def good_job(tiny_checkpoint, coco_folder, tmp_path):
    return job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "out")


REMOTE = "http://ray-head.invalid:8265"  # never contacted: these tests stop before any request


def test_relative_paths_are_refused_for_a_remote_cluster(tmp_path, tiny_checkpoint):
    (tmp_path / "images").mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"images": {"path": "images"}, "boxes": {"path": "boxes.json"},
                               "pose": {"model": str(tiny_checkpoint)}, "output": {"path": "s3://b/out"}}))
    with pytest.raises(SpecError) as caught:
        cluster.prepare(job, [], REMOTE)
    message = str(caught.value)
    assert "images.path: 'images'" in message and "boxes.path: 'boxes.json'" in message
    assert "output.path" not in message and REMOTE in message and "absolute path" in message
    result = runner.invoke(app, ["submit", str(job), "--address", REMOTE])
    assert result.exit_code == 2 and result.stderr.startswith("error: images.path: 'images'")


def test_absolute_local_paths_warn_and_urls_pass(good_job, write_job, tiny_checkpoint):
    good_job["output"]["path"] = "s3://bucket/out"
    submission, data = cluster.prepare(write_job(good_job), [], REMOTE)
    warned = " ".join(submission.warnings)
    assert "images.path" in warned and "boxes.path" in warned and "pose.model" in warned
    assert "output.path" not in warned
    assert data["output"]["path"] == "s3://bucket/out" and data["pose"]["model"] == str(tiny_checkpoint)
    # The same job on a head on this machine: its nodes see these files, nothing to warn about.
    local, _ = cluster.prepare(write_job(good_job, "again.yaml"), [], "127.0.0.1:8265")
    assert local.warnings == [] and local.address == "http://127.0.0.1:8265"


def test_credentials_never_reach_the_entrypoint_metadata_or_env(good_job, write_job):
    good_job["images"]["storage_options"] = {"key": "AKIAEXAMPLE", "secret": "very-secret-value"}
    submission, data = cluster.prepare(write_job(good_job), [], "http://127.0.0.1:8265")
    visible = json.dumps([submission.entrypoint, submission.metadata, submission.runtime_env, submission.warnings])
    assert "very-secret-value" not in visible and "AKIAEXAMPLE" not in visible
    assert "images.storage_options hold credentials" in " ".join(submission.warnings)
    assert data["images"]["storage_options"]["secret"] == "very-secret-value"  # the job needs them: in the spec file


def test_the_shipped_spec_is_resolved_and_parses_again(good_job, write_job, tmp_path, monkeypatch):
    from raypose.spec import parse_job_spec

    monkeypatch.chdir(tmp_path)
    submission, data = cluster.prepare(write_job(good_job), ["output.path=rel/out", "pose.batch_size=7"],
                                       "http://localhost:8265")
    assert data["output"]["path"] == str(tmp_path / "rel" / "out")  # relative to where submit ran
    assert parse_job_spec(data).pose.batch_size == 7
    assert submission.entrypoint == "python -m raypose.cli submit raypose-job.json"
    quiet, _ = cluster.prepare(write_job(good_job), [], "http://localhost:8265", quiet=True, log_format="json")
    assert quiet.entrypoint.endswith("raypose-job.json --quiet --log-format json")
    forced, _ = cluster.prepare(write_job(good_job), [], "http://localhost:8265", force=True)
    assert forced.entrypoint.endswith("raypose-job.json --force")


def test_runtime_env_merge():
    env = cluster.build_runtime_env("/spec", {"env_vars": {"A": 1}, "pip": ["x"], "excludes": ["*.bin"]})
    assert env["working_dir"] == "/spec" and env["pip"] == ["x"]
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "A": "1"}
    assert env["py_modules"] == [cluster.package_dir()] and Path(env["py_modules"][0], "cli.py").is_file()
    assert "*.bin" in env["excludes"] and "__pycache__/" in env["excludes"]
    assert "py_modules" not in cluster.build_runtime_env("/spec", {"py_modules": []})  # use the cluster's raypose
    with pytest.raises(SpecError, match="working_dir is taken"):
        cluster.build_runtime_env("/spec", {"working_dir": "."})


@pytest.mark.parametrize("text, fragment", [("{nope", "not valid JSON"), ("[1]", "expected a JSON object")])
def test_bad_runtime_env_json_exits_2(good_job, write_job, text, fragment):
    result = runner.invoke(app, ["submit", str(write_job(good_job)), "--address", REMOTE, "--runtime-env-json", text])
    assert result.exit_code == 2 and fragment in result.stderr


@pytest.mark.parametrize("flag", [["--no-wait"], ["--runtime-env-json", "{}"]])
def test_cluster_flags_need_an_address(good_job, write_job, flag):
    result = runner.invoke(app, ["submit", str(write_job(good_job)), *flag])
    assert result.exit_code == 2 and "only with --address" in result.stderr


def test_address_forms():
    assert cluster.normalize_address("head:8265") == "http://head:8265"
    assert cluster.normalize_address("https://head/ray/") == "https://head/ray"
    with pytest.raises(SpecError, match="http"):
        cluster.normalize_address("ray://head:10001")
    assert cluster.is_loopback("http://127.0.0.1:8265") and cluster.is_loopback("http://localhost:1")
    assert not cluster.is_loopback(REMOTE)


def test_auth_token_is_found_where_ray_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    assert cluster.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert cluster.auth_headers() == {"Authorization": "Bearer from-home"}
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert cluster.auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert cluster.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster.auth_headers() == {}


@pytest.mark.parametrize(
    "status, code, message, expected",
    [("SUCCEEDED", 0, "", 0), ("FAILED", 2, "", 2), ("FAILED", 1, "", 1), ("FAILED", 137, "", 1),
     ("FAILED", None, "Job entrypoint command failed with exit code 2, last logs", 2),
     ("FAILED", None, "runtime env setup failed", 1), ("STOPPED", None, "", 1)],
)
def test_exit_codes(status, code, message, expected):
    details = SimpleNamespace(status=SimpleNamespace(value=status), driver_exit_code=code, message=message)
    assert cluster.exit_code(details) == expected


class FakeClient:
    """Jobs API stand-in: a log that grows while the job runs, and a websocket that may fail."""

    def __init__(self, chunks, tail_works=True):
        self.chunks, self.tail_works, self.polls = chunks, tail_works, 0

    async def tail_job_logs(self, job_id):
        if not self.tail_works:
            raise ConnectionError("websocket refused by a proxy")
        for chunk in self.chunks:
            yield chunk

    def get_job_status(self, job_id):
        self.polls += 1
        return SimpleNamespace(value="SUCCEEDED" if self.tail_works or self.polls >= len(self.chunks) else "RUNNING")

    def get_job_logs(self, job_id):
        return "".join(self.chunks[: self.polls] if not self.tail_works else self.chunks)

    def get_job_info(self, job_id):
        return SimpleNamespace(status=SimpleNamespace(value="SUCCEEDED"), driver_exit_code=0, message="")


@pytest.mark.parametrize("tail_works", [True, False], ids=["websocket", "polling"])
def test_follow_passes_whole_lines_once(tail_works):
    client = FakeClient(["Running entry", "point\nline 2\n", "done: 1 images\n"], tail_works=tail_works)
    lines = []
    details = cluster.follow(client, "job-1", lines.append, poll_s=0)
    assert lines == ["Running entrypoint", "line 2", "done: 1 images"]
    assert cluster.exit_code(details) == 0


def test_relay_quiet_and_json(capsys):
    log = ["Running entrypoint for job x: python -m raypose.cli ...", "2026 INFO raypose.pipeline: job x started",
           "done: 3 images, 6 instances, 0 errors, 1.0 crops/s -> /o", "error: images.path: nope"]
    for line in log:
        cluster.relay("text", quiet=True)(line)
    out, err = capsys.readouterr()
    assert out == log[2] + "\n" and err == log[3] + "\n"
    for line in log[:2] + ['{"event": "job_summary", "images": 3}']:
        cluster.relay("json")(line)
    out, _ = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0]["message"] == log[0] and records[2] == {"event": "job_summary", "images": 3}
