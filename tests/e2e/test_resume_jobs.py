"""Jobs that survive: shard commits, kill and resume, dying workers, failing batches, error budgets."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import job_dict, read_json
from typer.testing import CliRunner

from raypose.cli import app
from raypose.pipeline.watchdog import descendants
from raypose.testing.synthetic import make_coco_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """Twelve small images, 1-2 persons each: six shards of about two images."""
    folder = tmp_path_factory.mktemp("many")
    sizes = [(160 + 8 * i, 120 + 4 * i) for i in range(12)]
    make_coco_dataset(folder, sizes, persons_per_image=[1 + i % 2 for i in range(12)], seed=3)
    return folder


def spec_for(folder: Path, checkpoint, output: Path, **sections) -> dict:
    spec = job_dict(folder / "images", folder / "boxes.json", checkpoint, output, **sections)
    spec["output"]["images_per_shard"] = 2
    spec["resources"] = {"images_per_crop_task": 1}
    spec["pose"]["batch_size"] = 2
    return spec


def submit(job: Path, *args: str):
    return runner.invoke(app, ["submit", str(job), *args], catch_exceptions=False)


def rows_by_instance(output: Path) -> dict:
    table = pq.read_table(output / "keypoints")
    return {(r["image_key"], r["instance_index"]): r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def full_run(ray_session, many_images, tiny_checkpoint, tmp_path_factory) -> Path:
    """The same job, uninterrupted: the reference for every resumed or faulted run."""
    out = tmp_path_factory.mktemp("full") / "out"
    job = tmp_path_factory.mktemp("fulljob") / "job.yaml"
    job.write_text(json.dumps(spec_for(many_images, tiny_checkpoint, out)))
    result = submit(job)
    assert result.exit_code == 0, result.output
    return out


def assert_same_rows(output: Path, reference: Path):
    ours, expected = rows_by_instance(output), rows_by_instance(reference)
    table = pq.read_table(output / "keypoints")
    assert table.num_rows == len(ours) == len(expected)  # no (image, instance) twice
    assert ours.keys() == expected.keys()
    for key, row in ours.items():
        assert row["keypoint_x"] == pytest.approx(expected[key]["keypoint_x"], abs=1e-3)
        assert row["keypoint_y"] == pytest.approx(expected[key]["keypoint_y"], abs=1e-3)


def test_shards_are_committed_with_markers(full_run, many_images):
    markers = sorted((full_run / "_shards").glob("*.json"))
    job = read_json(full_run / "_job.json")
    assert len(markers) == job["num_shards"] == 6
    coco = read_json(many_images / "boxes.json")
    assert sum(read_json(m)["instances"] for m in markers) == len(coco["annotations"])
    files = sorted((full_run / "keypoints").glob("shard-*.parquet"))
    assert {f.name[:11] for f in files} == {f"shard-{i:05d}" for i in range(6)}  # each shard's parts, all committed
    assert sorted(str(f) for m in markers for f in read_json(m)["files"] if "/keypoints/" in f) == [str(f) for f in files]
    manifest = read_json(full_run / "manifest.json")
    assert manifest["shards"] == {"total": 6, "reused": 0, "written": 6}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_kill_an_append_run_and_resume(full_run, many_images, tiny_checkpoint, tmp_path):
    """The first run labels the first two images; an append run over all twelve is killed mid-run (kill -9 of
    its driver); `--resume` finishes it: the same rows as one uninterrupted run, each exactly once."""
    out, folder = tmp_path / "out", tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    shutil.copy(many_images / "boxes.json", folder / "boxes.json")
    for image in sorted((many_images / "images").iterdir())[:2]:
        shutil.copy2(image, folder / "images" / image.name)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_for(folder, tiny_checkpoint, out)))
    started = submit(job, "--set", "limits.max_errored_fraction=1")  # the others' boxes: not found yet
    assert started.exit_code == 0, started.output
    for image in sorted((many_images / "images").iterdir())[2:]:
        shutil.copy2(image, folder / "images" / image.name)
    spec = spec_for(folder, tiny_checkpoint, out)
    spec["output"]["mode"] = "append"
    job.write_text(json.dumps(spec))
    env = dict(os.environ, RAYPOSE_FAULT="pose:sleep:5")  # half a second a pose batch: time to interrupt
    driver = subprocess.Popen(
        [sys.executable, "-m", "raypose.cli", "submit", str(job), "--quiet"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    ray_processes: set[int] = set()
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list((out / "_shards").glob("*.json"))) < 3:
            assert driver.poll() is None, driver.stdout.read().decode()[-2000:]
            time.sleep(0.05)
        ray_processes = {pid for pid in descendants(driver.pid) if "watchdog" not in _cmdline(pid)}
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies mid-run, as a preempted node would
        driver.wait(30)
        # ...and the embedded Ray it started goes with it (Ray's own agents would linger ~60 s).
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(pid) for pid in ray_processes):
            time.sleep(0.1)
        assert ray_processes and not [pid for pid in ray_processes if _alive(pid)]
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # whatever is left, if the test failed
        except ProcessLookupError:
            pass
    done = len(list((out / "_shards").glob("*.json")))
    assert 3 <= done < 6, "the driver was to be killed mid-run"
    assert read_json(out / "_job.json")["runs"][-1]["status"] == "running"

    result = submit(job, "--resume")
    assert result.exit_code == 0, result.output
    manifest = read_json(out / "manifest.json")
    assert manifest["shards"]["reused"] == done and manifest["shards"]["written"] == 6 - done
    assert [run["status"] for run in read_json(out / "_job.json")["runs"]] == ["succeeded", "succeeded"]
    assert_same_rows(out, full_run)


def test_resume_of_a_finished_job_writes_nothing_new(full_run, many_images, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_for(many_images, tiny_checkpoint, out)))
    assert submit(job).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "keypoints").iterdir()}
    result = submit(job, "--resume")
    assert result.exit_code == 0, result.output
    assert read_json(out / "manifest.json")["shards"] == {"total": 6, "reused": 6, "written": 0}
    assert {p.name: p.stat().st_mtime_ns for p in (out / "keypoints").iterdir()} == before
    assert_same_rows(out, full_run)


def test_resume_refuses_another_spec_unless_forced(full_run, many_images, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_for(many_images, tiny_checkpoint, out)))
    assert submit(job).exit_code == 0
    refused = submit(job, "--resume", "--set", "pose.flip_test=true")
    assert refused.exit_code == 2 and "made with other settings (pose.flip_test: false -> true)" in refused.output
    # Resources and batch sizes do not change the rows: resuming with others is fine.
    assert submit(job, "--resume", "--set", "pose.batch_size=4").exit_code == 0
    forced = submit(job, "--resume", "--force", "--set", "pose.flip_test=true")
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize("fault", ["pose:exit:2", "crop:exit:2"])
def test_a_dying_worker_is_retried_and_no_row_is_lost(full_run, many_images, tiny_checkpoint, tmp_path, monkeypatch, fault):
    monkeypatch.setenv("RAYPOSE_FAULT", fault)
    monkeypatch.setenv("RAYPOSE_FAULT_MARKER", str(tmp_path / "fired"))
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_for(many_images, tiny_checkpoint, tmp_path / "out")))
    result = submit(job)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fired").exists()  # the worker did die
    assert pq.read_table(tmp_path / "out" / "errors").num_rows == 0
    assert_same_rows(tmp_path / "out", full_run)


def test_actors_that_die_past_their_retries_end_the_job_with_one_line(many_images, tiny_checkpoint, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("RAYPOSE_FAULT", "pose:exit:1")  # every pose actor dies at its first batch, restarts too
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_for(many_images, tiny_checkpoint, tmp_path / "out", limits={"max_retries": 1})))
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 1, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: pose stage: actor died 2 times: its worker process has died"), line
    assert line.endswith("committed shards are kept: rerun with --resume")
    assert "Traceback" not in result.output


def test_a_model_that_raises_on_one_batch_loses_only_that_batch(full_run, many_images, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPOSE_FAULT", "model:raise:2")
    monkeypatch.setenv("RAYPOSE_FAULT_MARKER", str(tmp_path / "fired"))
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_for(many_images, tiny_checkpoint, tmp_path / "out", limits={"max_errored_fraction": 0.5})))
    result = submit(job)
    assert result.exit_code == 0, result.output
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert 1 <= len(errors) <= 2  # one pose batch (batch_size 2)
    assert {e["stage"] for e in errors} == {"pose"} and "fault injected in model" in errors[0]["reason"]
    ours, expected = rows_by_instance(tmp_path / "out"), rows_by_instance(full_run)
    assert len(ours) + len(errors) == len(expected)
    for key, row in ours.items():
        assert row["keypoint_x"] == pytest.approx(expected[key]["keypoint_x"], abs=1e-3)


def test_a_job_over_its_error_budget_fails_clearly(full_run, many_images, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPOSE_FAULT", "model:raise:1")  # every pose actor's first batch fails
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_for(many_images, tiny_checkpoint, tmp_path / "out", limits={"max_errored_fraction": 0.01})))
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 1
    assert "above limits.max_errored_fraction (1.0%)" in result.output
    assert read_json(tmp_path / "out" / "manifest.json")["status"] == "failed"


def test_a_write_task_that_cannot_write_ends_the_job_with_the_documented_line(ray_session, coco_folder, tiny_checkpoint,
                                                                              tmp_path, monkeypatch):
    # The write tasks' folder becomes unusable once the run has started (as a full disk or lost permission
    # would, but portable: a file where the parts' folder goes fails even for root).
    from raypose.output.writer import ShardWriter

    out = tmp_path / "out"
    original = ShardWriter.write_listing_errors

    def then_block_the_parts_folder(self, errors):
        original(self, errors)
        (out / "_tmp" / "parts").write_text("in the way")

    monkeypatch.setattr(ShardWriter, "write_listing_errors", then_block_the_parts_folder)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, out)))
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 1, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert re.match(rf"error: output.path: cannot write _tmp/parts/keypoints/shard-\d{{5}}-\w+\.parquet to {out}: "
                    r"NotADirectoryError: \[Errno 20\] Not a directory", line), line
    assert line.endswith("the job stopped (committed shards are kept: rerun with --resume when the output is writable)")
    assert "RayTaskError" not in result.output and "Traceback" not in result.output
