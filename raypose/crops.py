"""The crops: box -> center/scale -> UDP affine crop at the model's input size, and the CPU stage.

The geometry is transformers' VitPoseImageProcessor (mmpose's top-down UDP pipeline):
padding 1.25, box aspect fixed to the model input's, scale in units of 200 px, and a
warp that maps the box onto the crop's pixel centres 0..W-1 / 0..H-1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raypose.boxes import clip_boxes
from raypose.reader import ImageError, decode_image, read_bytes
from raypose.table import CROP_SCHEMA

PADDING = 1.25
PIXEL_STD = 200.0  # scale is expressed in units of 200 px, as in mmpose and transformers


def center_scale_from_boxes(
    xywh: np.ndarray, input_size: tuple[int, int], padding: float = PADDING
) -> tuple[np.ndarray, np.ndarray]:
    """COCO xywh boxes (N, 4) -> centers (N, 2) and scales (N, 2), float32.

    `input_size` is the model input (width, height); boxes are grown to its aspect ratio.
    """
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    x, y, w, h = xywh.T
    aspect = input_size[0] / input_size[1]
    centers = np.stack([x + w * 0.5, y + h * 0.5], axis=1).astype(np.float32)
    w, h = np.where(w > aspect * h, w, h * aspect), np.where(w > aspect * h, w / aspect, h)
    scales = np.stack([w / PIXEL_STD, h / PIXEL_STD], axis=1).astype(np.float32) * np.float32(padding)
    return centers, scales


def crop_sampling_grid(
    center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Source-pixel coordinates sampled by the crop's columns (W,) and rows (H,).

    UDP: the box's ends land on the crop's first and last pixel centres. The matrix is
    built in float32 and inverted in float64, as the reference does, so the sampling
    points (and hence rounding) agree with it.
    """
    width, height = input_size
    center = np.asarray(center, dtype=np.float32)
    box = np.asarray(scale, dtype=np.float32) * np.float32(PIXEL_STD)
    warp = np.eye(3, dtype=np.float32)
    warp[0, 0] = np.float32(width - 1.0) / box[0]
    warp[1, 1] = np.float32(height - 1.0) / box[1]
    warp[0, 2] = warp[0, 0] * (-center[0] + np.float32(0.5) * box[0])
    warp[1, 2] = warp[1, 1] * (-center[1] + np.float32(0.5) * box[1])
    inverse = np.linalg.inv(warp.astype(np.float64))
    return inverse[0, 0] * np.arange(width) + inverse[0, 2], inverse[1, 1] * np.arange(height) + inverse[1, 2]


def crop_image(
    image: np.ndarray, center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]
) -> np.ndarray:
    """One bilinear UDP crop (H, W, 3) uint8 of an RGB image (h, w, 3); samples outside the image are 0.

    Matches scipy's `affine_transform(order=1, mode="constant")` that the reference uses:
    rounded to nearest, and 0 beyond the outermost pixel centres.
    """
    xs, ys = crop_sampling_grid(center, scale, input_size)
    h, w = image.shape[:2]
    xc, yc = np.clip(xs, 0, w - 1), np.clip(ys, 0, h - 1)
    x0, y0 = np.floor(xc).astype(np.intp), np.floor(yc).astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    wx = (xc - x0).astype(np.float32)[None, :, None]
    wy = (yc - y0).astype(np.float32)[:, None, None]
    top = image[y0[:, None], x0] * (1 - wx) + image[y0[:, None], x1] * wx
    bottom = image[y1[:, None], x0] * (1 - wx) + image[y1[:, None], x1] * wx
    crop = np.rint(top * (1 - wy) + bottom * wy).astype(np.uint8)
    crop[:, (xs < 0) | (xs > w - 1)] = 0
    crop[(ys < 0) | (ys > h - 1)] = 0
    return crop


def make_crops(
    batch: pa.Table,
    *,
    input_sizes: dict[str, tuple[int, int]],
    routes: dict[str, str],
    default_expert: str,
    storage_options: dict[str, Any],
    max_pixels: int,
) -> pa.Table:
    """CPU stage: image rows with boxes -> one row per crop (or per failure), see `table.CROP_SCHEMA`.

    Each box goes to the expert its category routes to (`routes`, else `default_expert`) and is
    cropped at that expert's input size (width, height).
    """
    out = _CropRows()
    for task in batch.to_pylist():
        if task.get("error_stage"):
            out.failure(task, None, task["error_stage"], task["error_reason"])
            continue
        if not task["box_xywh"]:
            continue  # nothing to label (e.g. nothing detected); counted by the driver
        try:
            data = task.get("image_bytes") or read_bytes(task["image_uri"], storage_options)
            decoded = decode_image(data, max_pixels)
        except ImageError as exc:
            out.failure(task, None, exc.stage, str(exc))
            continue
        experts = [routes.get(c, default_expert) if c is not None else default_expert for c in task["category"]]
        try:
            _crop_boxes(task, decoded, experts, input_sizes, out)
        except Exception as exc:  # an unforeseen failure costs this image, never the batch
            out.discard(task["image_key"])
            out.failure(task, None, "crop", f"{type(exc).__name__}: {exc}")
    return out.table(CROP_SCHEMA)


def _crop_boxes(task: dict, decoded, experts: list[str], input_sizes: dict, out: "_CropRows") -> None:
    size = decoded.size
    expected = (task["expected_width"], task["expected_height"])
    if None not in expected and expected != size:
        out.failure(task, None, "decode", f"image is {size[0]}x{size[1]} but the boxes file says {expected[0]}x{expected[1]}")
        return
    image = np.asarray(decoded)
    clipped, reasons = clip_boxes(np.asarray(task["box_xywh"], dtype=np.float64), *size)
    for index, (reason, expert) in enumerate(zip(reasons, experts)):
        if reason is not None:
            out.failure(task, index, "boxes", reason, size)
            continue
        input_size = input_sizes[expert]
        center, scale = center_scale_from_boxes(clipped[index], input_size)
        crop = crop_image(image, center[0], scale[0], input_size)
        out.crop(task, index, size, clipped[index], expert, center[0], scale[0], crop)


class _CropRows:
    """Column buffers for the crop stage's output."""

    def __init__(self):
        self.columns: dict[str, list] = {}
        self.crops: list[bytes] = []

    def _row(self, task: dict, index: int | None, size, **values) -> None:
        row = {
            "image_key": task["image_key"],
            "image_uri": task["image_uri"],
            "image_width": size[0] if size else None,
            "image_height": size[1] if size else None,
            "instance_index": index,
            "annotation_id": task["annotation_id"][index] if index is not None else None,
            "category": task["category"][index] if index is not None else None,
            "box_score": task["box_score"][index] if index is not None else None,
            "box_source": task["box_source"],
            "detector_id": task.get("detector_id"),
            **values,
        }
        for name, value in row.items():
            self.columns.setdefault(name, []).append(value)

    def crop(self, task, index, size, box, expert, center, scale, crop: np.ndarray) -> None:
        self._row(
            task, index, size, bbox=box.tolist(), expert=expert, center=center.tolist(), scale=scale.tolist(),
            error_stage=None, error_reason=None,
        )
        self.crops.append(crop.tobytes())

    def failure(self, task, index, stage: str, reason: str, size=None) -> None:
        self._row(
            task, index, size, bbox=None, expert=None, center=None, scale=None, error_stage=stage, error_reason=reason
        )
        self.crops.append(None)

    def discard(self, image_key: str) -> None:
        """Drop the rows already added for an image (it is about to fail as a whole)."""
        keep = [i for i, key in enumerate(self.columns.get("image_key", [])) if key != image_key]
        self.columns = {name: [values[i] for i in keep] for name, values in self.columns.items()}
        self.crops = [self.crops[i] for i in keep]

    def table(self, schema: pa.Schema) -> pa.Table:
        if not self.crops:
            return schema.empty_table()
        columns = {name: pa.array(values, schema.field(name).type) for name, values in self.columns.items()}
        columns["crop"] = pa.array(self.crops, schema.field("crop").type)
        return pa.table(columns).select(schema.names).cast(schema)
