"""The corrections table: an import adds only what it does not hold, and the latest annotation of an instance wins."""

from __future__ import annotations

from datetime import datetime, timezone

from raypose.review.corrections import latest_corrections, read_corrections, write_corrections
from raypose.review.reading import JobOutput


def row(instance: int, annotation: str, minute: int, x: float) -> dict:
    return {"image_key": "a.jpg", "instance_index": instance, "new_instance": None, "category": "person",
            "keypoint_schema": "coco17", "bbox": [0.0, 0.0, 10.0, 10.0], "keypoint_x": [x], "keypoint_y": [1.0],
            "keypoint_visibility": [2], "deleted": False, "reviewer": "ann", "tool": "label-studio", "task_id": "1",
            "annotation_id": annotation, "job_id": "job-1",
            "reviewed_at": datetime(2026, 1, 1, 0, minute, tzinfo=timezone.utc)}


def test_importing_the_same_rows_twice_changes_nothing_and_the_latest_annotation_wins(tmp_path):
    (tmp_path / "out" / "keypoints").mkdir(parents=True)
    job = JobOutput.open(str(tmp_path / "out"))
    assert latest_corrections(job) == []
    assert write_corrections(job, [row(0, "5", 1, 3.0), row(1, "5", 1, 4.0)]) == 2
    parts = sorted((tmp_path / "out" / "corrections").iterdir())
    assert write_corrections(job, [row(0, "5", 1, 3.0), row(1, "5", 1, 4.0)]) == 0
    assert sorted((tmp_path / "out" / "corrections").iterdir()) == parts
    assert write_corrections(job, [row(0, "5", 1, 3.0), row(0, "6", 9, 7.0)]) == 1  # a later edit of instance 0
    assert read_corrections(job).num_rows == 3
    latest = latest_corrections(job)
    assert [(r["instance_index"], r["annotation_id"], r["keypoint_x"]) for r in latest] == [(0, "6", [7.0]), (1, "5", [4.0])]
