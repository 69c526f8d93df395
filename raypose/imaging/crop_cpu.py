"""The CPU crop: one bilinear UDP crop of an RGB image, bit-identical to the reference's."""

from __future__ import annotations

import threading

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
    # Bilinear is separable here (the warp has no rotation): blend across the columns on the
    # 2H source rows the crop reads, then down. Only those rows, and within them only the
    # columns' span, are ever touched: ~4x less than gathering the four corners per pixel.
    left = int(x0.min())
    window = _source_rows(image, np.concatenate([y0, y1]), left, int(x1.max()) + 1)
    height, width = len(ys), len(xs)
    channels = window.shape[2]
    rows = window.reshape(len(window), -1)  # each row's bytes: the gathers pick bytes, 3 per sample
    byte = np.arange(3)
    first = ((x0 - left)[:, None] * channels + byte).ravel()
    second = ((x1 - left)[:, None] * channels + byte).ravel()
    gathered, across, part, blended, lower = _scratch(2 * height, 3 * width)
    # The reference's float32 arithmetic, in reused buffers (fresh temporaries cost more than the
    # arithmetic: benchmarks/README.md): across = a * (1 - wx) + b * wx, then down by wy, rounded.
    np.take(rows, first, axis=1, out=gathered)
    np.multiply(gathered, np.repeat(1 - wx, 3)[None, :], out=across)
    np.take(rows, second, axis=1, out=gathered)
    np.multiply(gathered, np.repeat(wx, 3)[None, :], out=part)
    across += part
    np.multiply(across[:height], (1 - wy)[:, None], out=blended)
    np.multiply(across[height:], wy[:, None], out=lower)
    blended += lower
    crop = np.rint(blended, out=blended).astype(np.uint8).reshape(height, width, 3)
    crop[:, outside_x] = 0
    crop[outside_y] = 0
    return crop


_buffers = threading.local()


def _scratch(rows: int, columns: int) -> tuple[np.ndarray, ...]:
    """This thread's work buffers for a crop of this size: gathered bytes, two (rows, columns) float32
    blends, and two of half the rows."""
    cache = _buffers.__dict__.setdefault("by_shape", {})
    if (rows, columns) not in cache:
        cache[(rows, columns)] = (np.empty((rows, columns), np.uint8), np.empty((rows, columns), np.float32),
                                  np.empty((rows, columns), np.float32), np.empty((rows // 2, columns), np.float32),
                                  np.empty((rows // 2, columns), np.float32))
    return cache[(rows, columns)]


def _source_rows(image, rows: np.ndarray, left: int, right: int) -> np.ndarray:
    """Columns left..right-1 of the given rows, as a (len(rows), right - left, C) uint8 array."""
    if isinstance(image, Image.Image):
        top = int(rows.min())
        return np.asarray(image.crop((left, top, right, int(rows.max()) + 1)))[rows - top]
    return image[rows, left:right]
