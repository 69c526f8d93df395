"""The schemas (plain Arrow types, one definition) and the one failure-row builder."""

from __future__ import annotations

import pyarrow as pa

from raypose.schema import (
    CROP_SCHEMA,
    ERRORS_SCHEMA,
    KEYPOINTS_SCHEMA,
    POSE_OUTPUT_SCHEMA,
    fail_rows,
)


def crop_rows() -> pa.Table:
    rows = [
        {"image_key": "a", "instance_index": 0, "bbox": [1, 2, 3, 4], "expert": "coco", "center": [1, 2],
         "scale": [1, 1], "crop": b"xyz", "shard": 0, "image_rows": 2},
        {"image_key": "a", "instance_index": 1, "error_stage": "boxes", "error_reason": "nan", "shard": 0, "image_rows": 2},
        {"image_key": "b", "instance_index": 0, "bbox": [0, 0, 5, 5], "expert": "coco", "center": [2, 2],
         "scale": [1, 1], "crop": b"abc", "shard": 0, "image_rows": 1},
    ]
    return pa.Table.from_pylist(rows, schema=CROP_SCHEMA)


def test_outputs_are_plain_arrow_types():
    for schema in (KEYPOINTS_SCHEMA, ERRORS_SCHEMA, POSE_OUTPUT_SCHEMA, CROP_SCHEMA):
        for field in schema:
            assert not isinstance(field.type, pa.ExtensionType), field
    assert KEYPOINTS_SCHEMA.names[0] == "job_id" and "keypoint_x" in KEYPOINTS_SCHEMA.names


def test_fail_rows_sets_the_failing_rows_and_leaves_the_others():
    failed = fail_rows(crop_rows(), [True, False, False], "pose", "RuntimeError: boom").to_pylist()
    assert [(r["error_stage"], r["error_reason"]) for r in failed] == [
        ("pose", "RuntimeError: boom"), ("boxes", "nan"), (None, None)]
    assert failed[0]["bbox"] == [1, 2, 3, 4]  # a box's failure keeps its box
    per_row = fail_rows(crop_rows(), [True, False, True], ["crop", None, "pose"], ["x", None, "y"]).to_pylist()
    assert [(r["error_stage"], r["error_reason"]) for r in per_row] == [("crop", "x"), ("boxes", "nan"), ("pose", "y")]


def test_a_whole_image_failure_stands_for_its_image():
    [row] = fail_rows(crop_rows().slice(2, 1), [True], "decode", "truncated", whole_image=True).to_pylist()
    assert (row["error_stage"], row["error_reason"], row["image_rows"]) == ("decode", "truncated", 1)
    assert row["instance_index"] is None and row["bbox"] is None and row["crop"] is None and row["expert"] is None
    assert row["image_key"] == "b" and row["shard"] == 0
