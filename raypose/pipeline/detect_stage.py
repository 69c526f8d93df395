"""The detector stage: a Ray actor that fills in the boxes of image tasks that need detection."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raypose.errors import ImageError
from raypose.imaging.decode import decode_image
from raypose.inputs.fetch import read_task_bytes
from raypose.models.detector import Detector
from raypose.schema import IMAGE_TASK_SCHEMA

log = logging.getLogger(__name__)


class DetectStage:
    """Ray actor for the detector stage: fills the boxes of image tasks that need detection."""

    def __init__(self, detector, categories: list[str] | None, storage_options: dict[str, Any],
                 max_pixels: int, device: str, dtype: str, num_threads: int | None = None, image_column: str = "image"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.detector = Detector(detector, categories, device=device, dtype=dtype)
        self.storage_options = storage_options
        self.max_pixels = max_pixels
        self.image_column = image_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        return detect_rows(self.detector, batch, self.storage_options, self.max_pixels, self.image_column)


def detect_rows(
    detector: Detector, batch: pa.Table, storage_options: dict[str, Any], max_pixels: int, image_column: str = "image"
) -> pa.Table:
    """Image tasks in, the same tasks out with detected boxes (or a read/decode failure) filled in."""
    tasks = batch.to_pylist()
    todo, images, containers = [], [], {}
    for task in tasks:
        if not task["needs_detection"] or task["error_stage"]:
            continue
        try:
            data = read_task_bytes(task, storage_options, image_column, containers)
            image = np.asarray(decode_image(data, max_pixels))
        except ImageError as exc:
            task["error_stage"], task["error_reason"] = exc.stage, str(exc)
            continue
        task["image_bytes"] = data  # the crop stage decodes again but need not read again
        todo.append(task)
        images.append(image)
    try:
        found = detector.detect(images) if images else []
    except Exception as exc:  # a failed batch fails its images, not the job
        log.exception("detector batch of %d images failed", len(images))
        found = [exc] * len(images)
    for task, result in zip(todo, found):
        if isinstance(result, Exception):
            task["error_stage"], task["error_reason"] = "detect", f"{type(result).__name__}: {result}"
            task["image_bytes"] = None
            continue
        xywh, scores, names = result
        task.update(
            box_xywh=xywh.tolist(), box_score=scores.tolist(), category=names,
            annotation_id=[None] * len(names), box_source="detector", detector_id=detector.info.model_id,
            expected_width=None, expected_height=None,
        )
        if not names:
            task["image_bytes"] = None  # nothing to crop: don't ship the bytes on
    return pa.Table.from_pylist(tasks, schema=IMAGE_TASK_SCHEMA)
