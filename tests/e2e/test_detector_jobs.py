"""Detector jobs end to end: RT-DETR boxes for every image, or only for the images the boxes file lacks."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from helpers import DETECTOR_THRESHOLD, direct_detections, job_dict, read_json
from PIL import Image
from typer.testing import CliRunner

from raypose.cli import app


def test_detector_job_end_to_end(ray_session, detector_checkpoint, tiny_checkpoint, coco_folder, write_job, tmp_path):
    spec = job_dict(coco_folder / "images", None, tiny_checkpoint, tmp_path / "out")
    spec["boxes"] = {
        "source": "detector",
        "categories": ["person"],
        "detector": {"model": str(detector_checkpoint), "threshold": DETECTOR_THRESHOLD, "max_per_image": 2, "batch_size": 2},
    }
    result = CliRunner().invoke(app, ["submit", str(write_job(spec))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out" / "keypoints")
    rows = table.to_pylist()
    assert len(rows) == 6  # 3 images x max_per_image 2 (random weights find "persons" everywhere)
    assert {r["box_source"] for r in rows} == {"detector"}
    assert {r["detector_id"] for r in rows} == {str(detector_checkpoint)}
    assert {r["category"] for r in rows} == {"person"} and all(r["box_score"] >= DETECTOR_THRESHOLD for r in rows)
    assert all(r["annotation_id"] is None for r in rows)
    # The boxes are the detector's own on that image (clipped to it).
    first = [r for r in rows if r["image_key"] == "img_0000.jpg"]
    image = np.asarray(Image.open(coco_folder / "images" / "img_0000.jpg").convert("RGB"))
    ref = direct_detections(detector_checkpoint, image, DETECTOR_THRESHOLD)
    person = ref["labels"] == 0
    best = ref["boxes"][person][ref["scores"][person].argsort(descending=True)[:2]].numpy()
    ref_xywh = np.concatenate([best[:, :2], best[:, 2:] - best[:, :2]], axis=1)
    ours = np.array(sorted((r["bbox"] for r in first), key=lambda b: b[0]))
    ref_xywh = ref_xywh[np.argsort(ref_xywh[:, 0])]
    x1 = np.clip(ref_xywh[:, 0], 0, 320)
    np.testing.assert_allclose(ours[:, 0], x1, atol=1e-2)
    manifest = read_json(tmp_path / "out" / "manifest.json")
    assert manifest["counts"]["images_to_detect"] == 3 and manifest["counts"]["images_without_detections"] == 0
    assert manifest["detector"]["model"] == str(detector_checkpoint)


def test_detect_missing_detects_only_images_without_boxes(ray_session, detector_checkpoint, tiny_checkpoint, coco_folder, write_job, tmp_path):
    coco = read_json(coco_folder / "boxes.json")
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2]  # img_0001 loses its box
    (tmp_path / "boxes.json").write_text(__import__("json").dumps(coco))
    spec = job_dict(coco_folder / "images", tmp_path / "boxes.json", tiny_checkpoint, tmp_path / "out")
    spec["boxes"].update(detect_missing=True, detector={"model": str(detector_checkpoint), "threshold": DETECTOR_THRESHOLD, "max_per_image": 1})
    result = CliRunner().invoke(app, ["submit", str(write_job(spec))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "out" / "keypoints").to_pylist()
    sources = sorted((r["image_key"], r["box_source"]) for r in rows)
    assert sources == [("img_0000.jpg", "gt")] * 2 + [("img_0001.jpg", "detector")] + [("img_0002.jpg", "gt")] * 3
