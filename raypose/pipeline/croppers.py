"""Where a pose actor's crops come from: a cropper maps a batch to (rows, pixels), chosen once by the layout.

    CropColumn     crop tasks (`crop_stage.make_crops`) made the crops before the pose actor: they are a column
    CpuCropper     the pose actor decodes and cuts on its CPU (Pillow + `crop_cpu`), in threads
    DeviceCropper  tasks (`crop_stage.plan_crops`) read the images, their headers and the crops' geometry; the
                   pose actor decodes and cuts on its device (`crop_torch`)

`pixels(rows, input_size)` gives those rows' crops as one (N, H, W, 3) uint8 array or tensor; `parts(batch)`
says how a call's batch is cut so that no more than a bounded number of crops exist at once.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from raypose.errors import ImageError
from raypose.imaging.crop_torch import ImagesOnDevice
from raypose.imaging.decode_device import EncodedImage, PillowDecoder, decode_on_device
from raypose.pipeline.arrow_views import crop_array, pairs
from raypose.pipeline.blocks import image_blocks
from raypose.pipeline.crop_sources import planned_images
from raypose.pipeline.crop_stage import CropOptions, make_crops
from raypose.schema import fail_rows

log = logging.getLogger(__name__)

# (rows, input size) -> those rows' crops, (N, H, W, 3) uint8 (numpy on the CPU, or a tensor on the device).
Pixels = Callable[[list[int], tuple[int, int]], "np.ndarray | torch.Tensor"]


class CropColumn:
    """The batch is crop rows already (crop tasks made them): the pixels are its `crop` column."""

    def parts(self, batch: pa.Table) -> list[pa.Table]:
        return [batch]

    def __call__(self, batch: pa.Table, device: torch.device) -> tuple[pa.Table, Pixels]:
        return batch, column_pixels(batch)


@dataclass(frozen=True)
class CpuCropper:
    """The pose actor makes the crops from image rows on its CPU, `threads` images at a time, at most
    `boxes_per_call` boxes' crops at a time (`parts`: the forwards of one part run before the next is cut)."""

    options: CropOptions
    threads: int = 1
    boxes_per_call: int | None = None

    def parts(self, batch: pa.Table) -> list[pa.Table]:
        """The batch's image rows in parts of at most `boxes_per_call` boxes (images are in parts already, `blocks`)."""
        if not self.boxes_per_call:
            return [batch]
        return image_blocks(batch, batch.num_rows, self.boxes_per_call)

    def __call__(self, batch: pa.Table, device: torch.device) -> tuple[pa.Table, Pixels]:
        rows = make_crops(batch, options=self.options, threads=self.threads)
        return rows, column_pixels(rows)


@dataclass(frozen=True)
class DeviceCropper:
    """The pose actor decodes and cuts on its device the crops `plan_crops` tasks planned (rows with `SOURCE_FIELDS`).

    `decoder`: the layout's (`decode_device`); Pillow's pixels, as the CPU croppers decode, by default.
    """

    options: CropOptions
    decoder: PillowDecoder = PillowDecoder()

    def parts(self, batch: pa.Table) -> list[pa.Table]:
        return [batch]  # pose.batch_size planned rows a call: bounded already

    def __call__(self, rows: pa.Table, device: torch.device) -> tuple[pa.Table, Pixels]:
        images = planned_images(rows)
        try:
            return cut_on_device(rows, images, device, self.options.max_pixels, self.decoder)
        except Exception as exc:  # e.g. out of GPU memory: this call's crops fail as rows, the job goes on
            log.exception("cutting %d images' crops on %s failed", len(images), device)
            crop_rows_mask = [e is not None and s is None for e, s in zip(rows.column("expert").to_pylist(),
                                                                         rows.column("error_stage").to_pylist())]
            failed = fail_rows(rows, crop_rows_mask, "crop", f"{type(exc).__name__}: {exc}")
            return failed, column_pixels(failed)


def cut_on_device(rows: pa.Table, images: list[EncodedImage], device: torch.device, max_pixels: int,
                  decoder: PillowDecoder = PillowDecoder()) -> tuple[pa.Table, Pixels]:
    """Decode the images on `device` and return the rows (an image that fails to decode: error rows, `_fail_images`)
    and the pixels function that cuts each forward batch's crops when it asks for them, so no more
    than one batch of crops exists at a time."""
    decoded = decode_on_device(images, device, max_pixels, decoder)
    errors = {i: pixels for i, pixels in enumerate(decoded) if isinstance(pixels, ImageError)}
    if errors:
        rows, images = _fail_images(rows, images, errors)
        decoded = [pixels for pixels in decoded if not isinstance(pixels, ImageError)]
    on_device = ImagesOnDevice(decoded)
    del decoded
    centers, scales = pairs(rows.column("center")), pairs(rows.column("scale"))
    image_of = np.full(rows.num_rows, -1, np.int64)
    for n, image in enumerate(images):
        image_of[image.rows] = n

    def pixels(indices: list[int], input_size: tuple[int, int]) -> torch.Tensor:
        return on_device.crops(centers[indices], scales[indices], image_of[indices].tolist(), input_size)

    return rows, pixels


def _fail_images(rows: pa.Table, images: list[EncodedImage], errors: dict[int, ImageError]):
    """The rows with those of images that failed to decode failed, and the images left to cut.

    An image all of whose rows are in this call becomes one error row, as the CPU croppers record
    it. One whose rows are spread over calls (Ray Data cuts the planned rows into pose batches
    anywhere) or over parts (`blocks.image_parts`) fails row by row: another call cannot know of this
    one's error row, and the writer counts every row the image was planned to give.
    """
    keys = rows.column("image_key").to_pylist()
    image_rows = rows.column("image_rows").to_pylist()
    held = Counter(keys)
    whole, partial = {}, {}
    for i, error in errors.items():
        first = images[i].rows[0]
        if held[keys[first]] == image_rows[first]:
            whole.setdefault(keys[first], (first, error))  # its box-failure rows go too: the image is one error now
        else:
            partial.update({row: error for row in images[i].rows})
    if partial:
        rows = fail_rows(rows, np.isin(np.arange(rows.num_rows), list(partial)),
                         [partial[r].stage if r in partial else None for r in range(rows.num_rows)],
                         [str(partial[r]) if r in partial else None for r in range(rows.num_rows)])
    keep = [row for row in range(rows.num_rows) if keys[row] not in whole]
    renumber = {row: j for j, row in enumerate(keep)}
    firsts = [first for first, _ in whole.values()]
    failed = fail_rows(rows.take(pa.array(firsts, pa.int64())), np.ones(len(firsts), bool), [e.stage for _, e in whole.values()],
                       [str(e) for _, e in whole.values()], whole_image=True)
    kept = [replace(image, rows=[renumber[r] for r in image.rows])
            for i, image in enumerate(images) if i not in errors]
    return pa.concat_tables([rows.take(keep), failed]), kept


def column_pixels(batch: pa.Table) -> Pixels:
    """The pixels of crop rows whose crops are their `crop` column."""
    crops = batch.column("crop")
    # combine_chunks copies even a single chunk.
    crops = crops.chunk(0) if crops.num_chunks == 1 else crops.combine_chunks()
    return functools.partial(crop_array, crops)
