"""Crops on the pose device: images decoded there (nvJPEG, or on the CPU and copied) and cut in torch.

The crop stage leaves the CPU only the bytes and the geometry (`EncodedImage`); here a
call's images are decoded in one batched call and laid end to end in one flat buffer
(`ImagesOnDevice`), and each forward batch's crops are cut from it in one pass with the
arithmetic of `crop_cpu.crop_image` (same sampling points, same float32 operations, same
rounding): from the same decoded pixels, the same crops.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from raypose.errors import ImageError
from raypose.imaging.decode import decode_image
from raypose.imaging.geometry import bilinear_taps, crop_sampling_grid
from raypose.imaging.jpeg_region import decode_jpeg_region


@dataclass
class EncodedImage:
    """An image whose crops are cut on the pose device: its bytes, and what its header says."""

    data: bytes | memoryview  # the encoded image
    size: tuple[int, int]  # (width, height) after EXIF orientation, from the header
    plain_jpeg: bool  # a GPU JPEG decoder can take it as it is (`decode.probe_image`)
    rows: list[int] = field(default_factory=list)  # its crop rows in the crop stage's table
    region: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) its crops read, when decoded alone is exact


@dataclass
class DecodedImage:
    """An image's pixels on the device, (3, h, w) uint8: the whole image, or the region of it from `origin`."""

    pixels: torch.Tensor
    size: tuple[int, int]  # (width, height) of the whole image
    origin: tuple[int, int] = (0, 0)  # where `pixels` start in it


def gpu_jpeg_decoder() -> Callable | None:
    """torchvision's batched nvJPEG decode, or None where torchvision is not installed."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


def decode_on_device(images: list[EncodedImage], device: torch.device, max_pixels: int, nvjpeg: bool) -> list:
    """Each image as a `DecodedImage` on `device`, or the ImageError it failed with.

    With `nvjpeg` (a GPU, and torchvision), plain JPEGs go to nvJPEG in one call, whole. Otherwise
    an image with a `region` has only that region decoded (`jpeg_region`: Pillow's pixels); the
    rest are decoded by Pillow as the CPU stage does; both are copied over.
    """
    decoded: list = [None] * len(images)
    decoder = gpu_jpeg_decoder() if nvjpeg else None
    if nvjpeg and decoder is None:
        raise RuntimeError("the job's layout chose nvJPEG, but torchvision is not installed where the pose actor runs")
    batch = [i for i, image in enumerate(images) if decoder is not None and image.plain_jpeg]
    if batch:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only bytes: the decoder only reads
            data = [torch.from_numpy(np.frombuffer(images[i].data, dtype=np.uint8)) for i in batch]
        try:
            decoded_batch = decoder(data, device)
        except Exception:  # one bad image fails the whole call: find it one at a time
            decoded_batch = []
            for tensor in data:
                try:
                    decoded_batch.extend(decoder([tensor], device))
                except Exception:
                    decoded_batch.append(None)  # Pillow says why, below
        for i, pixels in zip(batch, decoded_batch):
            if pixels is not None:
                decoded[i] = _checked(DecodedImage(pixels, images[i].size), images[i])
    for i, image in enumerate(images):
        if decoded[i] is not None or image.region is None:
            continue
        region = decode_jpeg_region(image.data, image.region)  # None: Pillow decides, below
        if region is not None:
            decoded[i] = DecodedImage(_to_device(region, device), image.size, image.region[:2])
    for i, image in enumerate(images):
        if decoded[i] is not None:
            continue
        try:
            rgb = np.asarray(decode_image(image.data, max_pixels))
        except ImageError as exc:
            decoded[i] = exc
            continue
        decoded[i] = _checked(DecodedImage(_to_device(rgb, device), image.size), image)
    return decoded


def _to_device(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only array: it is only read
        return torch.from_numpy(rgb).to(device).permute(2, 0, 1)


def _checked(image: DecodedImage, encoded: EncodedImage) -> DecodedImage | ImageError:
    """The decoded image, or an ImageError when its pixels are not the size its header says."""
    height, width = image.pixels.shape[1:]
    if (width, height) != encoded.size:
        return ImageError(f"decoded to {width}x{height} but its header says {encoded.size[0]}x{encoded.size[1]}")
    return image


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
    table = torch.from_numpy(table).to(device)
    start, w, h = torch.from_numpy(image_shape).to(device).unbind(1)
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
