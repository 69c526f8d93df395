"""Progress in images: the status line, and what each mode emits."""

from __future__ import annotations

import io
import json
import logging
import threading

from raypose.pipeline.progress import Progress


def test_the_line_says_loading_until_rows_come_then_images_instances_errors_rate_and_eta():
    progress = Progress(200, "off")
    assert progress.line().startswith("loading the model; 0/200 images")
    progress.update(50, 120, 3)
    status = progress.status()
    assert (status["images_done"], status["images"], status["instances"], status["errors"]) == (50, 200, 120, 3)
    assert not status["loading_model"] and status["crops_per_second"] > 0
    line = progress.line()
    assert line.startswith("50/200 images (25%), 120 instances, 3 errors, ") and "crops/s" in line


def test_a_terminal_gets_one_line_redrawn_and_ended(monkeypatch):
    stream = io.StringIO()
    progress = Progress(10, "terminal", stream=stream)
    progress.update(10, 20, 0)
    progress.finish()
    assert stream.getvalue().startswith("\r\033[K10/10 images (100%), 20 instances, 0 errors")
    assert stream.getvalue().endswith("\n")


def test_json_mode_reports_each_commit_and_progress_records(caplog):
    progress = Progress(10, "json")
    with caplog.at_level(logging.INFO, logger="raypose.pipeline.progress"):
        progress.update(4, 8, 1)
        progress.shard_committed({"shard": 0, "job_id": "j", "images": 4, "instances": 8, "errors": 1})
        progress.report()  # what the timer does every interval
    events = [r.__dict__.get("event") for r in caplog.records]
    assert events == ["shard_committed", "progress"]
    [commit] = [r for r in caplog.records if r.__dict__.get("event") == "shard_committed"]
    assert (commit.shard, commit.images, commit.instances) == (0, 4, 8)
    record = next(r for r in caplog.records if r.__dict__.get("event") == "progress")
    json.dumps({k: record.__dict__[k] for k in ("images_done", "images", "eta_seconds", "crops_per_second")})


def test_the_timer_reports_until_finished_and_a_function_gets_the_numbers():
    seen: list[dict] = []
    reported = threading.Event()

    def call(status: dict) -> None:
        seen.append(status)
        reported.set()

    progress = Progress.of(10, call)
    progress.interval = 0.01
    progress.update(3, 6, 0)
    progress.start()
    assert reported.wait(10), "the timer never reported"
    progress.update(10, 20, 1)
    progress.finish()  # and one last report, with the final numbers
    assert seen[0]["images_done"] == 3 and seen[-1]["images_done"] == 10 and seen[-1]["errors"] == 1
    count = len(seen)
    progress.report()
    assert len(seen) == count + 1  # the timer has stopped: only this call reported


def test_a_run_announces_its_plan_on_a_terminal_or_in_a_log_only():
    for mode, shown in (("terminal", True), ("log", True), ("json", False), ("off", False)):
        stream = io.StringIO()
        counts = {"images": 4, "boxes": 8, "images_without_boxes": 0, "images_kept": 2}
        Progress(4, mode, stream=stream).planned("job-1", counts, 1, 3)
        assert (stream.getvalue() == "job job-1: 4 images to label, 8 boxes (0 images without boxes skipped, "
                "2 already labelled); 1 new shards, 3 kept\n") is shown, mode


def test_off_and_quiet_emit_nothing(caplog):
    assert Progress.of(5, None).mode == Progress.of(5, "off").mode == "off"
    assert Progress.of(5, "json").mode == "json"
    assert Progress.of(5, "auto").mode in ("terminal", "log")
    progress = Progress(5, "off").start()
    progress.update(5, 5, 0)
    progress.finish()
    assert not caplog.records
