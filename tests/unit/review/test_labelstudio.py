"""Label Studio without Ray: the labeling config, and an annotation's regions back to instances (or reported)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import fsspec

from raypose.imaging.keypoint_schemas import COCO17
from raypose.review.labelstudio import corrections_of, label_config
from raypose.review.reading import JobOutput

JOB = JobOutput(url="memory://out", fs=fsspec.filesystem("memory"), root="/out", manifest=None,
                schemas={"coco17": COCO17.describe()})
W, H = 200, 100


def predicted(index: int, box: list[float]) -> dict:
    return {"image_key": "a.jpg", "instance_index": index, "category": "person", "keypoint_schema": "coco17",
            "bbox": box, "keypoint_x": [box[0] + 1.234567 + k for k in range(17)],
            "keypoint_y": [box[1] + 2.5] * 17, "image_width": W, "image_height": H, "job_id": "run-1"}


def keypoint(region_id: str, name: str, x: float, y: float) -> dict:
    return {"id": region_id, "type": "keypointlabels", "from_name": "keypoints", "to_name": "image",
            "value": {"x": 100 * x / W, "y": 100 * y / H, "width": 0.6, "keypointlabels": [name]}}


def box(region_id: str, xywh: list[float], category: str = "person") -> dict:
    x, y, w, h = xywh
    return {"id": region_id, "type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "value": {"x": 100 * x / W, "y": 100 * y / H, "width": 100 * w / W, "height": 100 * h / H,
                      "rectanglelabels": [category]}}


def test_the_config_has_every_keypoint_name_a_box_label_per_category_and_the_limb_relation():
    root = ET.fromstring(label_config({"person": COCO17.describe()}))
    assert [lb.get("value") for lb in root.find("KeyPointLabels")] == list(COCO17.keypoints)
    assert [lb.get("value") for lb in root.find("RectangleLabels")] == ["person"]
    assert root.find("Relations/Relation").get("value") == "limb" and root.find("Image").get("value") == "$image"


def test_regions_go_back_to_their_instances_and_unmoved_points_keep_the_predictions_values():
    rows = [predicted(0, [10.0, 10.0, 60.0, 80.0]), predicted(1, [100.0, 10.0, 60.0, 80.0])]
    nose = rows[0]["keypoint_x"][0], rows[0]["keypoint_y"][0]
    result = [box("rp-0-box", rows[0]["bbox"]), keypoint("rp-0-0", "nose", *nose),
              keypoint("rp-0-5", "left_shoulder", 40.0, 30.0),  # moved
              box("rp-1-box", rows[1]["bbox"]), keypoint("rp-1-9", "left_wrist", 120.0, 50.0),
              keypoint("Ab3dE", "right_wrist", 30.0, 60.0)]  # drawn by the reviewer, inside box 0 only
    got, problems = corrections_of({"result": result}, rows, {"person": "coco17"}, JOB)
    assert problems == []
    first, second = sorted(got, key=lambda r: r["instance_index"])
    assert first["keypoint_x"][0] == nose[0] and first["keypoint_y"][0] == nose[1]  # exact, not via percentages
    assert math.isclose(first["keypoint_x"][5], 40.0) and first["keypoint_visibility"][10] == 2
    assert first["keypoint_visibility"].count(2) == 3 and math.isnan(first["keypoint_x"][1])
    assert first["bbox"] == rows[0]["bbox"] and not first["deleted"]
    assert second["keypoint_visibility"].count(2) == 1
    assert {r["job_id"] for r in got} == {"run-1"}  # the run whose rows were corrected


def test_what_cannot_be_placed_is_reported_and_a_removed_instance_is_deleted():
    rows = [predicted(0, [10.0, 10.0, 60.0, 80.0]), predicted(1, [40.0, 10.0, 60.0, 80.0])]
    result = [box("rp-0-box", rows[0]["bbox"]), box("rp-1-box", rows[1]["bbox"]),
              keypoint("free-1", "nose", 50.0, 20.0),  # in both boxes
              keypoint("free-2", "nose", 190.0, 95.0),  # in none
              box("new-box", [150.0, 5.0, 40.0, 40.0]), keypoint("free-3", "left_eye", 160.0, 20.0),
              box("new-dog", [120.0, 60.0, 30.0, 30.0], category="dog")]
    got, problems = corrections_of({"result": result}, rows, {"person": "coco17"}, JOB)
    assert any("lies in 2 boxes" in p for p in problems) and any("lies in 0 boxes" in p for p in problems)
    assert any("'new-dog'" in p and "'dog'" in p for p in problems)
    [drawn] = [r for r in got if r["new_instance"] == "new-box"]
    assert drawn["instance_index"] is None and drawn["keypoint_visibility"][1] == 2 and drawn["bbox"] == [150.0, 5.0, 40.0, 40.0]
    gone, _ = corrections_of({"result": [box("rp-0-box", rows[0]["bbox"])]}, rows, {"person": "coco17"}, JOB)
    assert [(r["instance_index"], r["deleted"]) for r in gone] == [(0, False), (1, True)]


def test_regions_the_tool_gave_ids_of_its_own_find_their_instance_where_they_were_predicted():
    rows = [predicted(0, [10.0, 10.0, 60.0, 80.0]), predicted(1, [40.0, 10.0, 60.0, 80.0])]
    result = [box("q1", rows[0]["bbox"]), box("q2", rows[1]["bbox"]),
              keypoint("q3", "nose", rows[1]["keypoint_x"][0], rows[1]["keypoint_y"][0]),  # unmoved, overlap
              keypoint("q4", "left_eye", 20.0, 20.0)]  # moved, in box 0 only
    got, problems = corrections_of({"result": result}, rows, {"person": "coco17"}, JOB)
    assert problems == [] and [r["instance_index"] for r in got] == [0, 1] and not any(r["deleted"] for r in got)
    assert got[1]["keypoint_visibility"][0] == 2 and got[0]["keypoint_visibility"][1] == 2
