"""annotate's spec (a job's sections, validated as a job's) and its rows' last form, without Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raypose.config.spec import BoxesSpec, PoseSpec
from raypose.errors import SpecError
from raypose.pipeline.annotate import NO_ROOT, annotated_rows, annotation_spec
from raypose.schema import ANNOTATED_SCHEMA, KEYPOINTS_SCHEMA, POSE_OUTPUT_SCHEMA


def test_a_model_id_is_enough_and_the_boxes_come_from_the_rows(tmp_path, monkeypatch):
    spec = annotation_spec("usyd-community/vitpose-base-simple")
    assert spec.pose.model == "usyd-community/vitpose-base-simple"
    assert (spec.boxes.source, spec.boxes.bbox_column, spec.images.image_column) == ("inline", "bbox", "image")
    assert spec.images.path == NO_ROOT
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    spec = annotation_spec(PoseSpec(model="ckpt", flip_test=True), boxes=BoxesSpec(source="detector"),
                           images={"path": "photos", "key_column": "id"}, resources={"pose_actors": [1, 2]})
    assert spec.pose.model == str(tmp_path / "ckpt") and spec.pose.flip_test  # a local folder, made absolute
    assert spec.images.path == str(tmp_path / "photos") and spec.images.key_column == "id"
    assert spec.boxes.source == "detector" and spec.resources.pose_actors == (1, 2)


@pytest.mark.parametrize("sections, message", [
    ({"pose": {"model": "m", "batch_size": 0}}, "pose.batch_size: expected a positive integer, got 0"),
    ({"boxes": {"source": "coco"}}, "boxes.source: 'coco': annotate takes the boxes the rows hold"),
    ({"boxes": {"path": "boxes.json"}}, "boxes.path: not for a Dataset's rows"),
    ({"images": {"storage_options": {}}}, "images.storage_options: not for a Dataset's rows"),
    ({"resources": {"crop_in": "gpu"}}, "resources.crop_in:"),
    ({"images": ["image"]}, "expected a mapping or a spec section, got list"),
])
def test_sections_are_checked_as_a_jobs(sections, message):
    pose = sections.pop("pose", "m")
    with pytest.raises(SpecError, match=message):
        annotation_spec(pose, **sections)


def pose_rows(rows: list[dict]) -> pa.Table:
    filled = [{name: row.get(name) for name in POSE_OUTPUT_SCHEMA.names} for row in rows]
    return pa.Table.from_pylist(filled, schema=POSE_OUTPUT_SCHEMA)


def test_rows_keep_instances_and_failures_with_the_keypoint_tables_types():
    batch = pose_rows([
        {"image_key": "a", "instance_index": 0, "expert": "coco", "keypoint_x": [1.0], "keypoint_y": [2.0],
         "keypoint_score": [0.5], "instance_score": 0.5, "shard": 0, "image_rows": 3},
        {"image_key": "a", "instance_index": 1, "error_stage": "boxes", "error_reason": "box has zero width",
         "expert": None, "shard": 0, "image_rows": 3},
        {"image_key": "b", "shard": 0, "image_rows": 1},  # an image with nothing to label: no row out
    ])
    out = annotated_rows(batch, models={"coco": ("org/vitpose", "abc123")})
    assert out.schema == ANNOTATED_SCHEMA
    for field in ANNOTATED_SCHEMA:  # the keypoint table's columns, same types, but the job's
        if field.name not in ("error_stage", "error_reason"):
            assert KEYPOINTS_SCHEMA.field(field.name).type == field.type
    assert set(KEYPOINTS_SCHEMA.names) - set(ANNOTATED_SCHEMA.names) == {"job_id", "track_id"}  # tracks are linked as a job's shard commits
    rows = out.to_pylist()
    assert [(r["instance_index"], r["model_id"], r["model_revision"], r["error_stage"]) for r in rows] == [
        (0, "org/vitpose", "abc123", None), (1, None, None, "boxes")]
