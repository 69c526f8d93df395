"""The detector: an RT-DETR (or RT-DETRv2) checkpoint read without weights, and loaded to find boxes in images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raypose.config.spec import DetectorSpec
from raypose.errors import SpecError
from raypose.models.hub import check_weights, load_pretrained

FIELD = "boxes.detector.model"


@dataclass(frozen=True)
class DetectorInfo:
    """A detector checkpoint as seen from its config: its id, revision and label names."""

    model_id: str
    revision: str | None
    labels: dict[int, str]


def inspect_detector(detector: DetectorSpec, categories: list[str] | None) -> DetectorInfo:
    """Read the detector's config and its weights' header (no tensor); check the wanted categories are among its labels."""
    from transformers import AutoConfig, AutoModelForObjectDetection

    config = load_pretrained(AutoConfig.from_pretrained, detector.model, detector.revision, FIELD)
    if getattr(config, "model_type", None) not in ("rt_detr", "rt_detr_v2"):
        raise SpecError(
            f"{FIELD}: {detector.model!r} is a {getattr(config, 'model_type', 'unknown')!r} model, "
            "expected an RT-DETR checkpoint (model_type 'rt_detr' or 'rt_detr_v2')"
        )
    check_weights(detector.model, detector.revision, FIELD, config, AutoModelForObjectDetection.from_config)
    labels = {int(k): v for k, v in config.id2label.items()}
    unknown = sorted(set(categories or ()) - set(labels.values()))
    if unknown:
        raise SpecError(
            f"boxes.categories: {', '.join(map(repr, unknown))} not among {detector.model!r}'s labels "
            f"(e.g. {', '.join(sorted(labels.values())[:12])}, ...)"
        )
    return DetectorInfo(
        model_id=detector.model,
        revision=detector.revision or getattr(config, "_commit_hash", None),
        labels=labels,
    )


def class_aware_nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by greedy NMS within each label, highest score first."""
    order = scores.argsort(descending=True)
    boxes_xyxy, labels = boxes_xyxy[order], labels[order]
    keep = torch.ones(len(order), dtype=torch.bool)
    overlaps = box_iou(boxes_xyxy, boxes_xyxy)
    same = labels[:, None] == labels[None, :]
    for i in range(len(order)):
        if keep[i]:
            suppressed = (overlaps[i] > iou) & same[i]
            suppressed[: i + 1] = False
            keep &= ~suppressed
    return order[keep]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes (N, 4) x (M, 4)."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


class Detector:
    """A loaded RT-DETR with its own image processor: images in, COCO xywh boxes out."""

    def __init__(self, detector: DetectorSpec, categories: list[str] | None, device: str = "cpu",
                 dtype: str = "float32"):
        """`device` and `dtype` as the job's layout resolved them."""
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.spec = detector
        self.info = inspect_detector(detector, categories)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.processor = load_pretrained(AutoImageProcessor.from_pretrained, detector.model, detector.revision, FIELD)
        model = load_pretrained(
            AutoModelForObjectDetection.from_pretrained, detector.model, detector.revision, FIELD,
            use_safetensors=True, dtype=self.dtype,
        )
        self.model = model.to(self.device).eval()
        wanted = set(categories) if categories is not None else None
        self.wanted = [i for i, name in self.info.labels.items() if wanted is None or name in wanted]

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
        """RGB images -> per image: boxes (n, 4) COCO xywh in image pixels, scores (n,), label names."""
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        sizes = [(image.shape[0], image.shape[1]) for image in images]
        results = self.processor.post_process_object_detection(
            outputs, threshold=self.spec.threshold, target_sizes=sizes
        )
        return [self._select(r) for r in results]

    def _select(self, result: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
        boxes, scores, labels = result["boxes"].cpu(), result["scores"].cpu(), result["labels"].cpu()
        keep = torch.isin(labels, torch.tensor(self.wanted, dtype=labels.dtype))
        sides = boxes[:, 2:] - boxes[:, :2]
        keep &= (sides >= self.spec.min_size).all(dim=1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if self.spec.nms_iou is not None and len(boxes):
            kept = class_aware_nms(boxes, scores, labels, self.spec.nms_iou)
            boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
        order = scores.argsort(descending=True)[: self.spec.max_per_image]
        boxes, scores, labels = boxes[order], scores[order], labels[order]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).numpy().astype(np.float64)
        return xywh, scores.numpy(), [self.info.labels[int(label)] for label in labels]
