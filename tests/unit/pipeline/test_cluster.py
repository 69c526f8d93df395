"""`raypose submit --address` without a cluster: the submission (spec, paths, credentials, runtime_env),
the address and token, exit codes, and how the job's log is relayed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import job_dict
from typer.testing import CliRunner

from raypose.cli import app
from raypose.errors import SpecError
from raypose.pipeline import cluster

runner = CliRunner()


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
    from raypose.config.spec import parse_job_spec

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
