"""The crops on the pose device: images decoded there (nvJPEG, when torchvision has it) and cut in torch.

`crops.plan_crops` leaves the CPU only the bytes and the geometry; here a call's images are
decoded in one batched call and laid end to end in one flat buffer, and each forward batch's
crops are cut from it in one pass with the arithmetic of `crops.crop_image` (same sampling
points, same float32 operations, same rounding): from the same decoded pixels, the same crops.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from raypose.crops import PendingImage, bilinear_taps, crop_sampling_grid
from raypose.reader import ImageError, decode_image

# (rows, input size) -> those rows' crops, (N, H, W, 3) uint8 on the pose device.
CropCutter = Callable[[list[int], tuple[int, int]], torch.Tensor]


def gpu_jpeg_decoder() -> Callable | None:
    """torchvision's batched nvJPEG decode, or None where torchvision is not installed."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


def decode_on_device(images: list[PendingImage], device: torch.device, max_pixels: int) -> list:
    """Each image as a (3, h, w) uint8 tensor on `device`, or the ImageError it failed with.

    Plain JPEGs go to nvJPEG in one call on a GPU; the rest (and everything on CPU, or without
    torchvision) are decoded by Pillow as the CPU stage does and copied over.
    """
    decoded: list = [None] * len(images)
    nvjpeg = gpu_jpeg_decoder() if device.type == "cuda" else None
    batch = [i for i, image in enumerate(images) if nvjpeg is not None and image.plain_jpeg]
    if batch:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only bytes: the decoder only reads
            data = [torch.from_numpy(np.frombuffer(images[i].data, dtype=np.uint8)) for i in batch]
        try:
            decoded_batch = nvjpeg(data, device)
        except Exception:  # one bad image fails the whole call: find it one at a time
            decoded_batch = []
            for tensor in data:
                try:
                    decoded_batch.extend(nvjpeg([tensor], device))
                except Exception:
                    decoded_batch.append(None)  # Pillow says why, below
        for i, pixels in zip(batch, decoded_batch):
            decoded[i] = pixels
    for i, image in enumerate(images):
        if decoded[i] is not None:
            continue
        try:
            rgb = np.asarray(decode_image(image.data, max_pixels))
        except ImageError as exc:
            decoded[i] = exc
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only array: it is only read
            decoded[i] = torch.from_numpy(rgb).to(device).permute(2, 0, 1)
    for i, (image, pixels) in enumerate(zip(images, decoded)):
        if isinstance(pixels, torch.Tensor) and (pixels.shape[2], pixels.shape[1]) != image.size:
            decoded[i] = ImageError(
                f"decoded to {pixels.shape[2]}x{pixels.shape[1]} but its header says {image.size[0]}x{image.size[1]}"
            )
    return decoded


def cut_crops(
    table: pa.Table, images: list[PendingImage], device: torch.device, max_pixels: int
) -> tuple[pa.Table, CropCutter]:
    """`plan_crops`' rows and images -> the rows (an image that fails to decode: one error row) and
    a cutter `(rows, input_size) -> (N, H, W, 3) uint8` of those rows' crops on `device`.

    The images are decoded here; each forward batch's crops are cut when it asks for them, so
    no more than one batch of crops exists at a time.
    """
    decoded = decode_on_device(images, device, max_pixels)
    failed = {i: pixels for i, pixels in enumerate(decoded) if isinstance(pixels, ImageError)}
    if failed:
        table, images, decoded = _fail_images(table, images, decoded, failed)
    centers = table.column("center").to_pylist()
    scales = table.column("scale").to_pylist()
    flat = torch.cat([pixels.reshape(-1) for pixels in decoded]) if decoded else None
    starts = np.cumsum([0] + [pixels.numel() for pixels in decoded])
    image_of = {row: n for n, image in enumerate(images) for row in image.rows}
    del decoded

    def cut(rows: list[int], input_size: tuple[int, int]) -> torch.Tensor:
        geometry = [(centers[row], scales[row], images[image_of[row]].size, int(starts[image_of[row]])) for row in rows]
        return _bilinear_crops(flat, geometry, tuple(input_size))

    return table, cut


def _bilinear_crops(flat: torch.Tensor, geometry: list, input_size: tuple[int, int]) -> torch.Tensor:
    """UDP crops (K, H, W, 3) uint8 from images laid end to end (CHW) in `flat`.

    `geometry`: per crop (center, scale, (w, h) of its image, the image's start in `flat`).
    Sampling points, weights and the zero border are `crops.crop_image`'s, built on the CPU
    (W + H numbers a crop) and sent in one copy; the gathers and blends run on the device.
    """
    width, height = input_size
    k = len(geometry)
    # Per crop, along W then H: the lower and upper source index, the weight of the upper, and inside (1) / outside (0).
    table = np.empty((k, 4, width + height), dtype=np.float64)
    image_shape = np.empty((k, 3), dtype=np.int64)  # start, w, h
    for j, (center, scale, (w, h), start) in enumerate(geometry):
        xs, ys = crop_sampling_grid(np.asarray(center, np.float32), np.asarray(scale, np.float32), input_size)
        for points, limit, part in ((xs, w, slice(0, width)), (ys, h, slice(width, None))):
            table[j, :3, part] = bilinear_taps(points, limit)
            table[j, 3, part] = (points >= 0) & (points <= limit - 1)
        image_shape[j] = (start, w, h)
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


def _fail_images(table: pa.Table, images: list[PendingImage], decoded: list, failed: dict[int, ImageError]):
    """Replace the rows of images that failed to decode by one error row each (as the CPU stage records them)."""
    keys = table.column("image_key").to_pylist()
    firsts = [images[i].rows[0] for i in failed]
    failed_keys = {keys[row] for row in firsts}  # its box-failure rows go too: the image is one error now
    keep = [row for row in range(table.num_rows) if keys[row] not in failed_keys]
    renumber = {row: j for j, row in enumerate(keep)}
    errors = table.take(firsts)
    n = len(firsts)
    nulls = {name: pa.nulls(n, errors.schema.field(name).type) for name in (
        "image_width", "image_height", "instance_index", "annotation_id", "category", "bbox", "box_score",
        "expert", "center", "scale", "crop")}
    nulls.update({
        "error_stage": pa.array([failed[i].stage for i in failed], pa.string()),
        "error_reason": pa.array([str(failed[i]) for i in failed], pa.string()),
        "image_rows": pa.array([1] * n, pa.int32()),
    })
    errors = pa.table({name: nulls.get(name, errors.column(name)) for name in table.schema.names}, schema=table.schema)
    table = pa.concat_tables([table.take(keep), errors])
    kept = [i for i in range(len(images)) if i not in failed]
    images = [PendingImage(images[i].data, images[i].size, images[i].plain_jpeg, [renumber[r] for r in images[i].rows])
              for i in kept]
    return table, images, [decoded[i] for i in kept]
