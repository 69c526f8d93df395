"""The detector stage: RT-DETR boxes equal to a direct transformers call, filters, NMS, failures as rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import job_dict, read_json
from raypose.cli import app
from raypose.detector import Detector, class_aware_nms, detect_rows, inspect_detector
from raypose.errors import SpecError
from raypose.spec import DetectorSpec
from raypose.synthetic import draw_people, make_detector_checkpoint
from raypose.table import IMAGE_TASK_SCHEMA

LABELS = ["person", "bicycle", "dog", "cat"]
THRESHOLD = 0.005  # random weights score near the focal-loss prior (~0.01)


@pytest.fixture(scope="module")
def detector_checkpoint(tmp_path_factory):
    return make_detector_checkpoint(tmp_path_factory.mktemp("detr") / "rtdetr-tiny", LABELS)


def direct_detections(checkpoint, image: np.ndarray, threshold: float):
    """The seed's detection step: processor -> RTDetrForObjectDetection -> post_process_object_detection."""
    from transformers import AutoImageProcessor, RTDetrForObjectDetection

    processor = AutoImageProcessor.from_pretrained(checkpoint)
    model = RTDetrForObjectDetection.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    return processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=[(image.shape[0], image.shape[1])]
    )[0]


def test_detect_equals_direct_call_with_filters(detector_checkpoint):
    image = np.asarray(draw_people(320, 240, np.array([[40.0, 20.0, 60.0, 180.0]])))
    detector = Detector(DetectorSpec(model=str(detector_checkpoint), threshold=THRESHOLD, max_per_image=100), ["person", "dog"])
    [(xywh, scores, names)] = detector.detect([image])
    ref = direct_detections(detector_checkpoint, image, THRESHOLD)
    wanted = [i for i, label in enumerate(ref["labels"].tolist()) if LABELS[label] in ("person", "dog")]
    assert len(wanted) > 0 and set(names) <= {"person", "dog"}
    order = np.argsort(-ref["scores"].numpy()[wanted], kind="stable")
    ref_boxes = ref["boxes"].numpy()[wanted][order]
    np.testing.assert_allclose(scores, ref["scores"].numpy()[wanted][order], atol=1e-6)
    np.testing.assert_allclose(xywh[:, :2], ref_boxes[:, :2], atol=1e-3)
    np.testing.assert_allclose(xywh[:, 2:], ref_boxes[:, 2:] - ref_boxes[:, :2], atol=1e-3)

    capped = Detector(DetectorSpec(model=str(detector_checkpoint), threshold=THRESHOLD, max_per_image=2), None)
    [(few, few_scores, _)] = capped.detect([image])
    assert len(few) == 2 and few_scores[0] >= few_scores[1]
    big = Detector(DetectorSpec(model=str(detector_checkpoint), threshold=THRESHOLD, min_size=1e6), None)
    assert len(big.detect([image])[0][0]) == 0


def test_class_aware_nms_suppresses_overlaps_within_a_class_only():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    assert sorted(class_aware_nms(boxes, scores, labels, iou=0.5).tolist()) == [0, 2, 3]
    assert sorted(class_aware_nms(boxes, scores, labels, iou=0.9).tolist()) == [0, 1, 2, 3]


def test_inspect_detector_checks_categories_and_model_type(detector_checkpoint, tiny_checkpoint):
    info = inspect_detector(DetectorSpec(model=str(detector_checkpoint)), ["person"])
    assert info.labels[2] == "dog"
    with pytest.raises(SpecError, match=r"boxes.categories: 'zebra' not among"):
        inspect_detector(DetectorSpec(model=str(detector_checkpoint)), ["person", "zebra"])
    with pytest.raises(SpecError, match=r"boxes.detector.model: .* is a 'vitpose' model"):
        inspect_detector(DetectorSpec(model=str(tiny_checkpoint)), ["person"])


def test_detect_rows_fills_boxes_and_keeps_failures(detector_checkpoint, tmp_path):
    draw_people(320, 240, np.array([[40.0, 20.0, 60.0, 180.0]])).save(tmp_path / "a.jpg")
    detector = Detector(DetectorSpec(model=str(detector_checkpoint), threshold=THRESHOLD, max_per_image=3), ["person"])
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
    assert all(s >= THRESHOLD for s in detected["box_score"]) and detected["image_bytes"]
    assert (gone["error_stage"], gone["error_reason"]) == ("read", "not found in storage")
    assert kept["box_xywh"] == [[1.0, 2.0, 3.0, 4.0]] and kept["box_source"] == "gt" and kept["image_bytes"] is None


def test_detector_job_end_to_end(ray_session, detector_checkpoint, tiny_checkpoint, coco_folder, write_job, tmp_path):
    spec = job_dict(coco_folder / "images", None, tiny_checkpoint, tmp_path / "out")
    spec["boxes"] = {
        "source": "detector",
        "categories": ["person"],
        "detector": {"model": str(detector_checkpoint), "threshold": THRESHOLD, "max_per_image": 2, "batch_size": 2},
    }
    result = CliRunner().invoke(app, ["submit", str(write_job(spec))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out" / "keypoints")
    rows = table.to_pylist()
    assert len(rows) == 6  # 3 images x max_per_image 2 (random weights find "persons" everywhere)
    assert {r["box_source"] for r in rows} == {"detector"}
    assert {r["detector_id"] for r in rows} == {str(detector_checkpoint)}
    assert {r["category"] for r in rows} == {"person"} and all(r["box_score"] >= THRESHOLD for r in rows)
    assert all(r["annotation_id"] is None for r in rows)
    # The boxes are the detector's own on that image (clipped to it).
    first = [r for r in rows if r["image_key"] == "img_0000.jpg"]
    image = np.asarray(Image.open(coco_folder / "images" / "img_0000.jpg").convert("RGB"))
    ref = direct_detections(detector_checkpoint, image, THRESHOLD)
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
    spec["boxes"].update(detect_missing=True, detector={"model": str(detector_checkpoint), "threshold": THRESHOLD, "max_per_image": 1})
    result = CliRunner().invoke(app, ["submit", str(write_job(spec))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "out" / "keypoints").to_pylist()
    sources = sorted((r["image_key"], r["box_source"]) for r in rows)
    assert sources == [("img_0000.jpg", "gt")] * 2 + [("img_0001.jpg", "detector")] + [("img_0002.jpg", "gt")] * 3
