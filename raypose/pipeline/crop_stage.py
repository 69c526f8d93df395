"""The crop stage: image rows with boxes -> one row per crop (or per failure), `schema.CROP_SCHEMA`.

Each box goes to the expert its category routes to and is cut at that expert's input size. The
per-image loop is here, with the two CPU stages built on it: `make_crops` cuts the crops' pixels
(in crop tasks, or in the pose actor's `croppers.CpuCropper`), `plan_crops` only reads the images'
headers and the crops' geometry and leaves the cuts to the pose actor's device (`croppers.DeviceCropper`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from raypose.errors import ImageError
from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.decode import ImageHeader, decode_image_reduced, probe_image
from raypose.imaging.decode_device import EncodedImage
from raypose.imaging.geometry import box_geometry, clip_boxes, crops_source_region, jpeg_reduction
from raypose.imaging.jpeg_region import decode_jpeg_region
from raypose.inputs.fetch import read_cropped_image
from raypose.models.routing import Routing
from raypose.pipeline.arrow_views import binary_column, pixel_view, single_block_images
from raypose.pipeline.blocks import image_blocks
from raypose.pipeline.crop_sources import with_sources
from raypose.pipeline.faults import inject
from raypose.pipeline.thread_window import in_order
from raypose.schema import CROP_SCHEMA


@dataclass(frozen=True)
class CropOptions:
    """What every cropper needs: the routing (expert and input size per category) and how to read images."""

    routing: Routing
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = 100_000_000
    image_column: str = "image"
    jpeg_draft: bool = False
    region_decode: bool = True

    @classmethod
    def from_spec(cls, spec, routing: Routing) -> "CropOptions":
        images = spec.images
        return cls(routing=routing, storage_options=dict(images.storage_options), max_pixels=images.max_pixels,
                   image_column=images.image_column, jpeg_draft=images.jpeg_draft,
                   region_decode=images.region_decode)


def make_crops(batch: pa.Table, *, options: CropOptions, threads: int = 1) -> pa.Table:
    """CPU stage: image rows with boxes -> one row per crop (or per failure), with the crops' pixels.

    A JPEG whose kind allows it is decoded only where its crops read (`jpeg_region`): the same
    pixels as Pillow's full decode, for less work. `options.jpeg_draft`: decode each JPEG at the
    largest DCT reduction (1/2, 1/4, 1/8) that every crop of the image still samples at no more
    than one point per decoded pixel (`geometry.jpeg_reduction`). Much less decoding and
    copying for large photos with large people; the crops' geometry is unchanged but their
    pixels are block means, not the reference's point samples (benchmarks/README.md gives the
    measured difference).

    `threads` > 1 decodes and cuts that many images at a time (the pose actor's cores).
    """
    table, _ = crop_rows(batch, options, functools.partial(_decode_here, options), threads)
    return table


def make_crops_in_parts(batch: pa.Table, *, options: CropOptions, boxes_per_part: int) -> Iterator[pa.Table]:
    """The crop tasks' stage: `make_crops` on the batch's image rows, at most `boxes_per_part` boxes at a time,
    each part's crop rows yielded (Ray Data holds them in its own blocks, not this task all at once)."""
    for part in image_blocks(batch, batch.num_rows, boxes_per_part):
        yield make_crops(part, options=options)


def crop_rows(batch: pa.Table, options: CropOptions, open_image, threads: int = 1) -> tuple[pa.Table, list[EncodedImage]]:
    """The batch's crop rows, each image opened by `open_image(data, header, crops)` (a source that cuts
    its crops here, or leaves them to the device); returns the rows and the images left to the device."""
    inject("crop")
    single_block_images()
    containers: dict = {}  # the Parquet file being read, shared by its images in this batch

    def image_rows(task: dict, data) -> _CropRows:
        rows = _CropRows()
        _crop_task(task, data, rows, options, open_image)
        rows.finish_image(task)
        return rows

    # The reads happen here, in order, never in the pool: the container cache is not thread-safe.
    reads = ((task, read_cropped_image(task, options.storage_options, options.image_column, containers))
             for task in _tasks(batch))
    out = _CropRows()
    device_images = []
    for rows in in_order(image_rows, reads, threads):
        for image in rows.device_images:
            image.rows = [out.count() + row for row in image.rows]
            device_images.append(image)
        out.extend(rows)
    return out.table(CROP_SCHEMA), device_images


def plan_crops(batch: pa.Table, *, options: CropOptions) -> pa.Table:
    """CPU stage of `resources.crop_in: pose_device`: image rows -> crop rows with their geometry and their
    images' bytes (`SOURCE_FIELDS`), no pixels: the files are read and only their headers parsed here, in
    tasks, so that the pose actor's host thread is left the decode and the cuts."""
    rows, images = plan_device_crops(batch, options)
    return with_sources(rows, images)


def plan_device_crops(batch: pa.Table, options: CropOptions) -> tuple[pa.Table, list[EncodedImage]]:
    """The crop rows with their geometry but no pixels (only headers are read), and the images to cut them from."""
    return crop_rows(batch, options, functools.partial(_leave_to_device, options))


@dataclass
class _CpuImage:
    """An image decoded here (whole, or the region its crops read): each crop is cut from its pixels on this CPU."""

    pixels: np.ndarray | Image.Image
    size: tuple[int, int]  # (width, height), full size, after EXIF orientation
    factor: int = 1  # the JPEG draft reduction it was decoded at
    origin: tuple[int, int] = (0, 0)  # where `pixels` start in the image (a region decode)

    def cut(self, row: int, center, scale, input_size) -> np.ndarray:
        return crop_image(self.pixels, center, scale, input_size, reduction=self.factor, full_size=self.size,
                          origin=self.origin)


@dataclass
class _DeviceImage:
    """An image left to the device: its crops' rows are recorded, no pixels are cut here."""

    image: EncodedImage

    def cut(self, row: int, center, scale, input_size) -> None:
        self.image.rows.append(row)


REGION_MAX_FRACTION = 0.8  # the largest region, as a fraction of the frame, decoded alone

# (center, scale, input size) of each crop an image will give
Crops = list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]


def _decode_here(options: CropOptions, data, header: ImageHeader, crops: Crops) -> _CpuImage:
    if options.jpeg_draft:
        reduction = jpeg_reduction(np.array([scale for _, scale, _ in crops]).reshape(-1, 2),
                                   [input_size for *_, input_size in crops])
        decoded, factor, size = decode_image_reduced(data, options.max_pixels, reduction)
        return _CpuImage(pixel_view(decoded), size, factor)
    region = _region_to_decode(options, header, crops)
    if region is not None:
        pixels = decode_jpeg_region(data, region)
        if pixels is not None:
            return _CpuImage(pixels, header.size, origin=region[:2])
    decoded, _, size = decode_image_reduced(data, options.max_pixels)
    return _CpuImage(pixel_view(decoded), size)


def _leave_to_device(options: CropOptions, data, header: ImageHeader, crops: Crops) -> _DeviceImage:
    return _DeviceImage(EncodedImage(data, header.size, header.plain_jpeg, region=_region_to_decode(options, header, crops)))


def _region_to_decode(options: CropOptions, header: ImageHeader, crops: Crops) -> tuple[int, int, int, int] | None:
    """The rectangle of a JPEG its crops read, when decoding it alone is exact and pays; else None."""
    if not (options.region_decode and not options.jpeg_draft and header.region_decodable and crops):
        return None
    x0, y0, x1, y1 = region = crops_source_region(crops, header.size)
    # nvImageCodec decodes a whole frame slower than Pillow does: a region pays when it is at
    # most about four fifths of the frame (the measured curve: benchmarks/README.md).
    return region if (x1 - x0) * (y1 - y0) <= REGION_MAX_FRACTION * header.size[0] * header.size[1] else None


def _tasks(batch: pa.Table) -> list[dict]:
    """The batch's rows as dicts; bytes read by an earlier stage stay in Arrow (a zero-copy view each)."""
    if "image_bytes" not in batch.column_names:
        return batch.to_pylist()
    data = batch.column("image_bytes")
    tasks = batch.drop_columns(["image_bytes"]).to_pylist()
    for i, task in enumerate(tasks):
        task["image_bytes"] = data[i].as_buffer()
    return tasks


def _crop_task(task: dict, data, out: "_CropRows", options: CropOptions, open_image) -> None:
    """One image's rows: a crop or a failure per box, or one failure for the whole image (`image_failure`).

    `data` is the image's bytes, or the ImageError reading them raised. The header comes first,
    then the boxes' geometry, then the pixels (`open_image`), which may be only those the crops read.
    """
    if task.get("error_stage"):
        out.image_failure(task, task["error_stage"], task["error_reason"])
        return
    if not task["box_xywh"]:
        return  # nothing to label (e.g. nothing detected): finish_image records the image
    routing = options.routing
    experts = [routing.expert_for(category) for category in task["category"]]
    try:
        if isinstance(data, ImageError):
            raise data
        header = probe_image(data, options.max_pixels)
    except ImageError as exc:
        out.image_failure(task, exc.stage, str(exc))
        return
    size = header.size
    expected = (task["expected_width"], task["expected_height"])
    if None not in expected and expected != size:
        out.image_failure(task, "decode", f"image is {size[0]}x{size[1]} but the boxes file says {expected[0]}x{expected[1]}")
        return
    clipped, reasons = clip_boxes(np.asarray(task["box_xywh"], dtype=np.float64), *size)
    sizes = {i: routing.input_size(e) for i, (r, e) in enumerate(zip(reasons, experts)) if r is None}
    try:
        geometry = box_geometry(clipped, sizes)
        image = open_image(data, header, [(*geometry[i], sizes[i]) for i in sorted(geometry)])
        for index, (reason, expert) in enumerate(zip(reasons, experts)):
            if reason is not None:
                out.failure(task, index, "boxes", reason, size)
                continue
            center, scale = geometry[index]
            crop = image.cut(out.count(), center, scale, sizes[index])
            out.crop(task, index, size, clipped[index], expert, center, scale, crop)
    except ImageError as exc:
        out.clear()
        out.image_failure(task, exc.stage, str(exc))
        return
    except Exception as exc:  # an unforeseen failure costs this image, never the batch
        out.clear()
        out.image_failure(task, "crop", f"{type(exc).__name__}: {exc}")
        return
    if isinstance(image, _DeviceImage) and image.image.rows:
        out.device_images.append(image.image)


class _CropRows:
    """Column buffers for the crop stage's output."""

    def __init__(self):
        self.columns: dict[str, list] = {}
        self.crops: list[np.ndarray | None] = []
        self.device_images: list[EncodedImage] = []  # the images the device cuts these rows' crops from

    def _row(self, task: dict, index: int | None, size, **values) -> None:
        row = {
            "image_key": task["image_key"],
            "image_uri": task["image_uri"],
            "image_width": size[0] if size else None,
            "image_height": size[1] if size else None,
            "instance_index": index + (task.get("box_offset") or 0) if index is not None else None,
            "annotation_id": task["annotation_id"][index] if index is not None else None,
            "category": task["category"][index] if index is not None else None,
            "box_score": task["box_score"][index] if index is not None else None,
            "box_source": task["box_source"],
            "detector_id": task.get("detector_id"),
            "frame_index": task.get("frame_index"),
            "frame_time": task.get("frame_time"),
            "video_fps": task.get("video_fps"),
            "shard": task.get("shard") or 0,
            **values,
        }
        for name, value in row.items():
            self.columns.setdefault(name, []).append(value)

    def crop(self, task, index, size, box, expert, center, scale, crop: np.ndarray | None) -> None:
        self._row(
            task, index, size, bbox=box.tolist(), expert=expert, center=center.tolist(), scale=scale.tolist(),
            error_stage=None, error_reason=None,
        )
        self.crops.append(crop)

    def failure(self, task, index, stage: str, reason: str, size=None) -> None:
        self._row(
            task, index, size, bbox=None, expert=None, center=None, scale=None, error_stage=stage, error_reason=reason
        )
        self.crops.append(None)

    def image_failure(self, task, stage: str, reason: str) -> None:
        """The image failed as a whole: one row; a part of an image (`blocks.image_parts`) gives one row per
        box of the part, as it would have had, since the writer counts the image's rows over all its parts."""
        if task.get("image_boxes") is None:
            self.failure(task, None, stage, reason)
            return
        for index in range(len(task["box_xywh"])):
            self.failure(task, index, stage, reason)

    def count(self) -> int:
        return len(self.crops)

    def finish_image(self, task: dict) -> None:
        """Stamp one image's rows with how many it gives (all its parts' rows, for a part); an image with none
        gets one empty row."""
        if not self.crops:
            self._row(task, None, None, bbox=None, expert=None, center=None, scale=None, error_stage=None, error_reason=None)
            self.crops.append(None)
        self.columns["image_rows"] = [task.get("image_boxes") or len(self.crops)] * len(self.crops)

    def clear(self) -> None:
        """Drop the rows already added (one image's, about to fail as a whole)."""
        self.columns, self.crops = {}, []

    def extend(self, other: "_CropRows") -> None:
        for name, values in other.columns.items():
            self.columns.setdefault(name, []).extend(values)
        self.crops += other.crops

    def table(self, schema: pa.Schema) -> pa.Table:
        if not self.crops:
            return schema.empty_table()
        columns = {name: pa.array(values, schema.field(name).type) for name, values in self.columns.items()}
        columns["crop"] = binary_column(self.crops)
        return pa.table(columns).select(schema.names).cast(schema)
