"""Crops cut on the pose device in torch, from a call's decoded images (`decode_device`).

The images are laid end to end in one flat buffer (`ImagesOnDevice`), and each forward
batch's crops are cut from it in one pass with the arithmetic of `crop_cpu.crop_image` (same
sampling points, same float32 operations, same rounding): from the same decoded pixels, the
same crops.
"""

from __future__ import annotations

import numpy as np
import torch

from raypose.imaging.decode_device import DecodedImage
from raypose.imaging.geometry import bilinear_taps, crop_sampling_grid


class ImagesOnDevice:
    """Decoded images (or regions of them) laid end to end in one flat device buffer; crops are cut from it."""

    def __init__(self, decoded: list[DecodedImage]):
        self.images = [(image.size, image.origin, (int(image.pixels.shape[2]), int(image.pixels.shape[1])))
                       for image in decoded]
        self.flat = torch.cat([image.pixels.reshape(-1) for image in decoded]) if decoded else None
        self.starts = np.cumsum([0] + [image.pixels.numel() for image in decoded])

    def crops(self, centers, scales, images: list[int], input_size: tuple[int, int]) -> torch.Tensor:
        """UDP crops (N, H, W, 3) uint8 on the device: crop j of image `images[j]` at centers[j], scales[j]."""
        geometry = [(c, s, *self.images[i], int(self.starts[i])) for c, s, i in zip(centers, scales, images)]
        return bilinear_crops(self.flat, geometry, tuple(input_size))


def bilinear_crops(flat: torch.Tensor, geometry: list, input_size: tuple[int, int]) -> torch.Tensor:
    """UDP crops (K, H, W, 3) uint8 from images laid end to end (CHW) in `flat`.

    `geometry`: per crop (center, scale, (w, h) of its image, (x, y) where the decoded pixels start
    in it, (w, h) of those pixels, their start in `flat`). Sampling points, weights and the zero
    border are `crop_cpu.crop_image`'s, on the whole image, built on the CPU (W + H numbers a crop,
    shifted onto the decoded region) and sent in one copy; the gathers and blends run on the device.
    """
    width, height = input_size
    k = len(geometry)
    # Per crop, along W then H: the lower and upper source index, the weight of the upper, and inside (1) / outside (0).
    table = np.empty((k, 4, width + height), dtype=np.float64)
    image_shape = np.empty((k, 3), dtype=np.int64)  # start, w, h of the decoded pixels
    for j, (center, scale, (w, h), (ox, oy), (rw, rh), start) in enumerate(geometry):
        xs, ys = crop_sampling_grid(np.asarray(center, np.float32), np.asarray(scale, np.float32), input_size)
        for points, limit, shift, part in ((xs, w, ox, slice(0, width)), (ys, h, oy, slice(width, None))):
            table[j, :3, part] = bilinear_taps(points, limit)
            table[j, :2, part] -= shift
            table[j, 3, part] = (points >= 0) & (points <= limit - 1)
        image_shape[j] = (start, rw, rh)
    device = flat.device
    table, image_shape = torch.from_numpy(table), torch.from_numpy(image_shape)
    if device.type == "cuda":
        # Pinned, the copies queue behind the forward in flight instead of waiting for it (`PoseEngine.submit`).
        table, image_shape = table.pin_memory(), image_shape.pin_memory()
    table = table.to(device, non_blocking=True)
    start, w, h = image_shape.to(device, non_blocking=True).unbind(1)
    x0, x1 = table[:, 0, :width].long(), table[:, 1, :width].long()
    y0, y1 = table[:, 0, width:].long(), table[:, 1, width:].long()
    wx = table[:, 2, :width].float()[:, None, :, None]
    wy = table[:, 2, width:].float()[:, :, None, None]
    inside = (table[:, 3, width:, None] * table[:, 3, None, :width]).to(torch.uint8)[..., None]
    # Index of pixel (channel c, row y, column x) of crop k's image: start + c*h*w + y*w + x.
    channel = (start[:, None] + torch.arange(3, device=device)[None, :] * (h * w)[:, None])[:, None, None, :]

    def gather(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        index = channel + (rows * w[:, None])[:, :, None, None] + columns[:, None, :, None]
        return flat.take(index).float()

    top = gather(y0, x0) * (1 - wx) + gather(y0, x1) * wx
    bottom = gather(y1, x0) * (1 - wx) + gather(y1, x1) * wx
    blended = top * (1 - wy) + bottom * wy
    return torch.round(blended).to(torch.uint8) * inside
