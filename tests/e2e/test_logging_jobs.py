"""Logs of real runs: `--log-format json` (every line a JSON object, start/finish records), `--quiet`, spec errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from helpers import job_dict, read_json
from typer.testing import CliRunner

from raypose.cli import app

RUN_TIMEOUT_S = 300


def run_cli(ray_session, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("RAYPOSE_JOB_ID", None)
    return subprocess.run([sys.executable, "-m", "raypose.cli", *args], env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


@pytest.fixture
def tiny_job(tiny_checkpoint, coco_folder, write_job, tmp_path):
    output = tmp_path / "out"
    return write_job(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, output)), output


def test_json_log_format_is_one_object_per_line_with_start_and_finish_counts(ray_session, tiny_job):
    job, output = tiny_job
    done = run_cli(ray_session, "submit", str(job), "--log-format", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    records = []
    for stream in (done.stderr, done.stdout):
        for line in stream.splitlines():
            assert line.strip(), "blank line"
            record = json.loads(line)  # every line, including Ray's own and its C++ core's
            assert isinstance(record, dict), line
            records.append(record)
    events = {}
    for record in records:
        if "event" in record:
            events.setdefault(record["event"], []).append(record)
    [started], [finished], [summary] = events["job_started"], events["job_finished"], events["job_summary"]
    job_id = read_json(output / "manifest.json")["job_id"]
    assert started["job_id"] == finished["job_id"] == summary["job_id"] == job_id
    assert started["level"] == "INFO" and started["logger"] == "raypose.pipeline.run"
    assert (started["images"], started["boxes"], started["output"]) == (3, 6, str(output))
    assert finished["status"] == "succeeded"
    assert (finished["images"], finished["boxes"], finished["instances"], finished["errors"]) == (3, 6, 6, 0)
    assert finished["crops_per_second"] > 0 and finished["output"] == str(output)
    assert finished["errors_by_stage"] == {}
    assert summary == {**summary, "images": 3, "instances": 6, "errors": 0, "status": "succeeded"}
    assert done.stdout.splitlines() == [json.dumps(summary)]  # stdout: the summary alone
    assert not any("Running Dataset" in r.get("message", "") for r in records)  # no progress drawings
    assert pq.read_table(output / "keypoints").num_rows == 6


def test_quiet_prints_only_the_summary_line(ray_session, tiny_job):
    job, output = tiny_job
    done = run_cli(ray_session, "submit", str(job), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = done.stdout.splitlines()
    assert line.startswith("done: 3 images, 6 instances, 0 errors, ") and line.endswith(f"crops/s -> {output}")
    # No log lines, no progress: what may remain on stderr are Ray's warnings about itself.
    assert " INFO " not in done.stderr and "\tINFO " not in done.stderr
    assert "Progress" not in done.stderr and "it/s" not in done.stderr and "row/s" not in done.stderr
    assert "6 boxes" not in done.stderr  # the text-mode start line


def test_a_spec_error_in_json_mode_is_one_json_line():
    result = CliRunner().invoke(app, ["submit", "/nonexistent/job.yaml", "--log-format", "json"])
    assert result.exit_code == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["event"] == "job_error" and record["exit_code"] == 2
    assert record["message"].startswith("error: /nonexistent/job.yaml: cannot read the job file")


