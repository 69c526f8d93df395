"""Pose-stage rows as the writer takes them, for tests of the writer and of what reads its output back."""

from __future__ import annotations

import pyarrow as pa

from raypose.schema import POSE_OUTPUT_SCHEMA


def pose_rows(*rows: dict) -> pa.Table:
    """Pose-stage rows: (image, instance) with keypoints, or with an error; `image_rows` says how many the image has."""
    filled = []
    for row in rows:
        labelled = row.get("error_stage") is None and row.get("instance_index") is not None
        filled.append({
            "image_uri": f"file:///{row['image_key']}", "box_source": "gt", "image_width": 64, "image_height": 48,
            "expert": "coco" if labelled else None, "keypoint_schema": "coco17" if labelled else None,
            "keypoint_x": [1.0] * 17 if labelled else None, "keypoint_y": [2.0] * 17 if labelled else None,
            "keypoint_score": [0.5] * 17 if labelled else None, "instance_score": 0.5 if labelled else None,
            "image_rows": 1, "shard": 0, **row,
        })
    return pa.Table.from_pylist(filled, schema=POSE_OUTPUT_SCHEMA)
