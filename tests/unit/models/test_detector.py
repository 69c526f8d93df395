"""The detector: RT-DETR boxes equal to a direct transformers call, with filters and NMS; its config checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DETECTOR_LABELS, DETECTOR_THRESHOLD, direct_detections

from raypose.config.spec import DetectorSpec
from raypose.errors import SpecError
from raypose.models.detector import Detector, class_aware_nms, inspect_detector
from raypose.testing.synthetic import draw_people


def test_detect_equals_direct_call_with_filters(detector_checkpoint):
    image = np.asarray(draw_people(320, 240, np.array([[40.0, 20.0, 60.0, 180.0]])))
    detector = Detector(DetectorSpec(model=str(detector_checkpoint), threshold=DETECTOR_THRESHOLD, max_per_image=100), ["person", "dog"])
    [(xywh, scores, names)] = detector.detect([image])
    ref = direct_detections(detector_checkpoint, image, DETECTOR_THRESHOLD)
    wanted = [i for i, label in enumerate(ref["labels"].tolist()) if DETECTOR_LABELS[label] in ("person", "dog")]
    assert len(wanted) > 0 and set(names) <= {"person", "dog"}
    order = np.argsort(-ref["scores"].numpy()[wanted], kind="stable")
    ref_boxes = ref["boxes"].numpy()[wanted][order]
    np.testing.assert_allclose(scores, ref["scores"].numpy()[wanted][order], atol=1e-6)
    np.testing.assert_allclose(xywh[:, :2], ref_boxes[:, :2], atol=1e-3)
    np.testing.assert_allclose(xywh[:, 2:], ref_boxes[:, 2:] - ref_boxes[:, :2], atol=1e-3)

    capped = Detector(DetectorSpec(model=str(detector_checkpoint), threshold=DETECTOR_THRESHOLD, max_per_image=2), None)
    [(few, few_scores, _)] = capped.detect([image])
    assert len(few) == 2 and few_scores[0] >= few_scores[1]
    big = Detector(DetectorSpec(model=str(detector_checkpoint), threshold=DETECTOR_THRESHOLD, min_size=1e6), None)
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


