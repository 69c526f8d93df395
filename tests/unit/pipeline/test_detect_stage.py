"""The detector stage without Ray: boxes filled in for the images that need them, failures kept as rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from helpers import DETECTOR_THRESHOLD

from raypose.config.spec import DetectorSpec
from raypose.models.detector import Detector
from raypose.pipeline.detect_stage import detect_rows
from raypose.schema import IMAGE_TASK_SCHEMA
from raypose.testing.synthetic import draw_people


def test_detect_rows_fills_boxes_and_keeps_failures(detector_checkpoint, tmp_path):
    draw_people(320, 240, np.array([[40.0, 20.0, 60.0, 180.0]])).save(tmp_path / "a.jpg")
    detector = Detector(DetectorSpec(model=str(detector_checkpoint), threshold=DETECTOR_THRESHOLD, max_per_image=3), ["person"])
    rows = [
        {"image_key": "a.jpg", "image_uri": str(tmp_path / "a.jpg"), "needs_detection": True},
        {"image_key": "gone.jpg", "image_uri": str(tmp_path / "gone.jpg"), "needs_detection": True},
        {"image_key": "gt.jpg", "image_uri": str(tmp_path / "a.jpg"), "needs_detection": False,
         "box_xywh": [[1.0, 2.0, 3.0, 4.0]], "category": ["person"], "box_source": "gt"},
    ]
    out = detect_rows(detector, pa.Table.from_pylist(rows, schema=IMAGE_TASK_SCHEMA), {}, 10**8).to_pylist()
    detected, gone, kept = out
    assert detected["box_source"] == "detector" and detected["detector_id"] == str(detector_checkpoint)
    assert 0 < len(detected["box_xywh"]) <= 3 and set(detected["category"]) == {"person"}
    assert all(s >= DETECTOR_THRESHOLD for s in detected["box_score"]) and detected["image_bytes"]
    assert (gone["error_stage"], gone["error_reason"]) == ("read", "not found in storage")
    assert kept["box_xywh"] == [[1.0, 2.0, 3.0, 4.0]] and kept["box_source"] == "gt" and kept["image_bytes"] is None


