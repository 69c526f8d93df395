"""Crop geometry: box -> center/scale at the model's input size, the UDP sampling grid, box clipping.

The geometry is transformers' VitPoseImageProcessor (mmpose's top-down UDP pipeline):
padding 1.25, box aspect fixed to the model input's, scale in units of 200 px, and a
warp that maps the box onto the crop's pixel centres 0..W-1 / 0..H-1.
"""

from __future__ import annotations

import numpy as np

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


def box_geometry(clipped: np.ndarray, sizes: dict[int, tuple[int, int]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Box index -> its crop's center and scale at the input size `sizes` gives it, one
    `center_scale_from_boxes` per input size rather than one per box."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in sizes.items():
        groups.setdefault(tuple(size), []).append(index)
    geometry = {}
    for size, group in groups.items():
        centers, scales = center_scale_from_boxes(clipped[group], size)
        geometry.update(zip(group, zip(centers, scales)))
    return geometry


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


def bilinear_taps(points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampling points along one axis of `size` pixels -> the lower and upper pixel each blends and
    the upper one's float32 weight; points beyond the ends take the end pixel (the border is zeroed apart)."""
    clipped = np.clip(points, 0, size - 1)
    lower = np.floor(clipped).astype(np.intp)
    return lower, np.minimum(lower + 1, size - 1), (clipped - lower).astype(np.float32)


def crops_source_region(
    crops: list[tuple[np.ndarray, np.ndarray, tuple[int, int]]], image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The smallest rectangle (x0, y0, x1, y1) of an image holding every pixel its crops' bilinear taps read.

    `crops` are (center, scale, input size) triples; `image_size` is (width, height).
    """
    width, height = image_size
    x0, y0, x1, y1 = width, height, 0, 0
    for center, scale, input_size in crops:
        xs, ys = crop_sampling_grid(center, scale, input_size)
        left, right, _ = bilinear_taps(xs, width)
        top, bottom, _ = bilinear_taps(ys, height)
        x0, x1 = min(x0, int(left.min())), max(x1, int(right.max()) + 1)
        y0, y1 = min(y0, int(top.min())), max(y1, int(bottom.max()) + 1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else (0, 0, width, height)


def clip_boxes(xywh: np.ndarray, width: int, height: int) -> tuple[np.ndarray, list[str | None]]:
    """Clip COCO xywh boxes to the image; return the clipped boxes and, per box, why it is unusable (or None)."""
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    x1, y1 = np.maximum(xywh[:, 0], 0.0), np.maximum(xywh[:, 1], 0.0)
    x2 = np.minimum(xywh[:, 0] + xywh[:, 2], width)
    y2 = np.minimum(xywh[:, 1] + xywh[:, 3], height)
    clipped = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    reasons: list[str | None] = []
    for box, out in zip(xywh, clipped):
        if not np.all(np.isfinite(box)):
            reasons.append(f"box has a non-finite coordinate: {box.tolist()}")
        elif box[2] <= 0 or box[3] <= 0:
            reasons.append(f"box has zero or negative size: w={box[2]:g}, h={box[3]:g}")
        elif out[2] <= 0 or out[3] <= 0:
            reasons.append(f"box {box.tolist()} lies outside the {width}x{height} image")
        elif out[2] < 1 or out[3] < 1:
            reasons.append(f"box {box.tolist()} covers less than a pixel of the {width}x{height} image")
        else:
            reasons.append(None)
    return clipped, reasons


JPEG_REDUCTIONS = (8, 4, 2)


def jpeg_reduction(scales: np.ndarray, input_sizes: list[tuple[int, int]]) -> int:
    """The JPEG draft reduction (8, 4, 2 or 1) an image's crops can all be cut from.

    A crop of scale s at input size (W, H) samples one point every s*200/(W-1) image
    pixels across and s*200/(H-1) down (its pitch). Decoding the image r times smaller
    keeps at least one decoded pixel per sample while r <= every crop's smaller pitch:
    the crops then need fewer pixels than the image has, and the decoder can skip them.
    """
    pitch = min(
        (float(min(s[0] * PIXEL_STD / (size[0] - 1), s[1] * PIXEL_STD / (size[1] - 1)))
         for s, size in zip(np.asarray(scales, np.float64).reshape(-1, 2), input_sizes)),
        default=0.0,
    )
    return next((r for r in JPEG_REDUCTIONS if r <= pitch), 1)
