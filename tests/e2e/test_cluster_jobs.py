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
from helpers import job_dict, read_json
from typer.testing import CliRunner

from raypose.cli import app
from raypose.pipeline import cluster

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


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _alive_nodes(address: str, token: str) -> int:
    """How many nodes the head's state API says are alive (0 while it cannot say)."""
    import urllib.request

    request = urllib.request.Request(f"{address}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.loads(response.read())["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(node.get("state") == "ALIVE" for node in nodes)


def _join_worker(ray_bin: str, gcs: str, env: dict, temp_dir: str) -> subprocess.Popen:
    """A second Ray node of 1 CPU on this machine, joined to the head at `gcs`, with ports and a temp dir of its own."""
    args = [
        ray_bin, "start", f"--address={gcs}", "--block", "--disable-usage-stats", "--num-cpus=1", "--num-gpus=0",
        "--object-store-memory=100000000", f"--temp-dir={temp_dir}", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    with open(Path(temp_dir) / "ray-worker.log", "wb") as log:
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def ray_head():
    """A real two-node Ray cluster on 127.0.0.1 (a head and a worker node of 1 CPU each), the dashboard and
    Jobs API on the head, token auth on; yields the head's address."""
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
    dashboard_port, gcs_port = free_port(), free_port()
    args = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
        "--include-dashboard=true", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    worker, worker_dir = None, None
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
        # Its own temp dir: nodes that shared one would clean up each other's runtime_env packages.
        worker_dir = tempfile.mkdtemp(prefix="rp-node-", dir="/tmp")
        worker = _join_worker(ray_bin, f"127.0.0.1:{gcs_port}", env, worker_dir)
        while _alive_nodes(address, token) < 2:
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the worker node did not join:\n{(Path(worker_dir) / 'ray-worker.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield SimpleNamespace(address=address, token=token, temp_dir=temp_dir,
                              client=JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}))
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        for folder in filter(None, (temp_dir, worker_dir)):
            deadline = time.monotonic() + 15
            while _our_pids(folder) and time.monotonic() < deadline:
                time.sleep(0.5)
            for pid in _our_pids(folder):  # stragglers of this cluster only
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(folder, ignore_errors=True)


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


# --- against the real cluster -------------------------------------------------------------


def test_a_job_with_defaults_runs_pose_actors_on_both_nodes_and_writes_the_single_node_rows(
        head_env, ray_session, tiny_checkpoint, coco_folder, write_job, tmp_path):
    spec = job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "cluster",
                    resources={"images_per_crop_task": 1})
    job = write_job(spec)
    # Each pose call takes 8 s more, so that the second node's actor is up before the first has taken every block.
    slow = json.dumps({"env_vars": {"RAYPOSE_FAULT": "pose:sleep:80"}})
    result = runner.invoke(app, ["submit", str(job), "--address", head_env.address, "--runtime-env-json", slow])
    assert result.exit_code == 0, result.output
    ran = read_json(tmp_path / "cluster" / "manifest.json")["layout"]
    assert (ran["pose"]["min_actors"], ran["cluster"]["nodes"]) == (2, 2)  # one per node, by their CPUs
    assert len(ran["ran"]["nodes"]) == 2 and all(n["crops"] > 0 for n in ran["ran"]["nodes"].values()), ran["ran"]
    # The same job on this machine's one-node Ray: the same rows.
    local = write_job({**spec, "output": {"path": str(tmp_path / "local")}}, "local.yaml")
    assert runner.invoke(app, ["submit", str(local)]).exit_code == 0
    order = [("image_key", "ascending"), ("instance_index", "ascending")]
    tables = [pq.read_table(tmp_path / name / "keypoints").drop_columns(["job_id"]).sort_by(order)
              for name in ("cluster", "local")]
    assert tables[0].replace_schema_metadata(None).equals(tables[1].replace_schema_metadata(None))


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
