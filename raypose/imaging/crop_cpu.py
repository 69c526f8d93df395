"""The CPU crop: one bilinear UDP crop of an RGB image, bit-identical to the reference's."""

from __future__ import annotations

import numpy as np
from PIL import Image

from raypose.imaging.geometry import bilinear_taps, crop_sampling_grid


def crop_image(
    image: np.ndarray | Image.Image,
    center: np.ndarray,
    scale: np.ndarray,
    input_size: tuple[int, int],
    *,
    reduction: int = 1,
    full_size: tuple[int, int] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """One bilinear UDP crop (H, W, 3) uint8 of an RGB image (h, w, 3); samples outside the image are 0.

    Matches scipy's `affine_transform(order=1, mode="constant")` that the reference uses:
    rounded to nearest, and 0 beyond the outermost pixel centres.

    `image` may have a fourth channel (`pixel_view`'s RGBX), which is ignored, or be an RGB PIL
    image: then only the rectangle the crop samples is turned into an array (same result).
    `reduction` > 1 says `image` was decoded that many times smaller (JPEG draft, see
    `jpeg_reduction`) from an image of `full_size` (width, height): the sampling points,
    computed in full-size pixels as always, are mapped onto the reduced pixel centres
    (x -> (x - (reduction - 1) / 2) / reduction). The geometry and the zero border are the
    full-size ones; the pixel values are block means, so they differ from the reference's.
    `origin` (x, y) says `image` holds only the region of a `full_size` image from there on
    (`geometry.crops_source_region`): the taps are those of the full image, shifted (same result).
    """
    xs, ys = crop_sampling_grid(center, scale, input_size)
    if isinstance(image, Image.Image):
        w, h = image.size
    else:
        h, w = image.shape[:2]
    full_w, full_h = full_size or (w, h)
    outside_x = (xs < 0) | (xs > full_w - 1)
    outside_y = (ys < 0) | (ys > full_h - 1)
    span_w, span_h = full_w, full_h
    if reduction != 1:
        xs = (xs - (reduction - 1) / 2) / reduction
        ys = (ys - (reduction - 1) / 2) / reduction
        span_w, span_h = w, h
    x0, x1, wx = bilinear_taps(xs, span_w)
    y0, y1, wy = bilinear_taps(ys, span_h)
    if origin != (0, 0):
        x0, x1, y0, y1 = x0 - origin[0], x1 - origin[0], y0 - origin[1], y1 - origin[1]
    wx, wy = wx[None, :, None], wy[:, None, None]
    # Bilinear is separable here (the warp has no rotation): blend across the columns on the
    # 2H source rows the crop reads, then down. Only those rows, and within them only the
    # columns' span, are ever touched: ~4x less than gathering the four corners per pixel.
    left = int(x0.min())
    window = _source_rows(image, np.concatenate([y0, y1]), left, int(x1.max()) + 1)
    across = np.take(window, x0 - left, axis=1).astype(np.float32)
    across *= 1 - wx
    across += np.take(window, x1 - left, axis=1) * wx
    height = len(ys)
    blended = across[:height] * (1 - wy)
    blended += across[height:] * wy
    crop = np.rint(blended[..., :3], out=blended[..., :3]).astype(np.uint8)
    crop[:, outside_x] = 0
    crop[outside_y] = 0
    return crop


def _source_rows(image, rows: np.ndarray, left: int, right: int) -> np.ndarray:
    """Columns left..right-1 of the given rows, as a (len(rows), right - left, C) uint8 array."""
    if isinstance(image, Image.Image):
        top = int(rows.min())
        return np.asarray(image.crop((left, top, right, int(rows.max()) + 1)))[rows - top]
    return image[rows, left:right]
