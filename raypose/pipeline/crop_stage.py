"""The crop stage: image rows with boxes -> one row per crop (or per failure), `schema.CROP_SCHEMA`.

Each box goes to the expert its category routes to and is cut at that expert's input size.
Where the pixels are cut is a cropper, chosen once by the job's layout (`layout.CropPlacement`):

    CropColumn     crop tasks (`make_crops`) made the crops before the pose actor: they are a column
    CpuCropper     the pose actor decodes and cuts on its CPU (Pillow + `crop_cpu`), in threads
    DeviceCropper  tasks (`plan_crops`) read the images, their headers and the crops' geometry; the pose
                   actor decodes and cuts on its device (`crop_torch`)

A cropper maps a batch to (rows, pixels): the crop rows, and `pixels(rows, input_size)` giving
those rows' crops as one (N, H, W, 3) uint8 array or tensor.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from raypose.errors import ImageError
from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.crop_torch import ImagesOnDevice
from raypose.imaging.decode_device import EncodedImage, PillowDecoder, decode_on_device
from raypose.imaging.decode import ImageHeader, decode_image_reduced, probe_image
from raypose.imaging.geometry import box_geometry, clip_boxes, crops_source_region, jpeg_reduction
from raypose.imaging.jpeg_region import decode_jpeg_region
from raypose.inputs.fetch import read_cropped_image
from raypose.models.routing import Routing
from raypose.pipeline.faults import inject
from raypose.schema import CROP_SCHEMA, fail_rows

log = logging.getLogger(__name__)

# (rows, input size) -> those rows' crops, (N, H, W, 3) uint8 (numpy on the CPU, or a tensor on the device).
Pixels = Callable[[list[int], tuple[int, int]], "np.ndarray | torch.Tensor"]


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


def crop_rows(batch: pa.Table, options: CropOptions, open_image, threads: int = 1) -> tuple[pa.Table, list[EncodedImage]]:
    """The batch's crop rows, each image opened by `open_image(data, header, crops)` (a source that cuts
    its crops here, or leaves them to the device); returns the rows and the images left to the device."""
    inject("crop")
    _single_block_images()
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
    for rows in _in_order(image_rows, reads, threads):
        for image in rows.device_images:
            image.rows = [out.count() + row for row in image.rows]
            device_images.append(image)
        out.extend(rows)
    return out.table(CROP_SCHEMA), device_images


class CropColumn:
    """The batch is crop rows already (crop tasks made them): the pixels are its `crop` column."""

    def __call__(self, batch: pa.Table, device: torch.device) -> tuple[pa.Table, Pixels]:
        return batch, column_pixels(batch)


@dataclass(frozen=True)
class CpuCropper:
    """The pose actor makes the crops from image rows on its CPU, `threads` images at a time."""

    options: CropOptions
    threads: int = 1

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


# What `plan_crops` adds to each crop row for the device: its image's encoded bytes (a dictionary
# column, so an image's bytes are held once however many crops it gives and however Ray Data
# batches the rows), the region of it to decode (null: whole) and whether a GPU JPEG decoder takes it.
SOURCE_FIELDS = [
    pa.field("source", pa.dictionary(pa.int32(), pa.large_binary())),
    pa.field("source_region", pa.list_(pa.int32(), 4)),
    pa.field("source_plain_jpeg", pa.bool_()),
]


def plan_crops(batch: pa.Table, *, options: CropOptions) -> pa.Table:
    """CPU stage of `resources.crop_in: pose_device`: image rows -> crop rows with their geometry and their
    images' bytes (`SOURCE_FIELDS`), no pixels: the files are read and only their headers parsed here, in
    tasks, so that the pose actor's host thread is left the decode and the cuts."""
    rows, images = plan_device_crops(batch, options)
    return with_sources(rows, images)


def plan_device_crops(batch: pa.Table, options: CropOptions) -> tuple[pa.Table, list[EncodedImage]]:
    """The crop rows with their geometry but no pixels (only headers are read), and the images to cut them from."""
    return crop_rows(batch, options, functools.partial(_leave_to_device, options))


def with_sources(rows: pa.Table, images: list[EncodedImage]) -> pa.Table:
    """The crop rows with each crop's image (`SOURCE_FIELDS`); rows without a crop to cut get nulls."""
    n = rows.num_rows
    index = np.full(n, -1, np.int32)
    region = np.zeros((n, 4), np.int32)
    has_region, plain = np.zeros(n, bool), np.zeros(n, bool)
    for k, image in enumerate(images):
        index[image.rows], plain[image.rows] = k, image.plain_jpeg
        if image.region is not None:
            region[image.rows], has_region[image.rows] = image.region, True
    views = [np.frombuffer(image.data, np.uint8) for image in images]
    offsets = np.zeros(len(views) + 1, np.int64)
    np.cumsum([v.size for v in views], out=offsets[1:])
    data = np.concatenate(views) if views else np.empty(0, np.uint8)
    encoded = pa.Array.from_buffers(pa.large_binary(), len(views), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    missing = index < 0
    columns = {
        "source": pa.DictionaryArray.from_arrays(pa.array(index, mask=missing), encoded),
        "source_region": pa.FixedSizeListArray.from_arrays(pa.array(region.reshape(-1)), 4,
                                                           mask=pa.array(~has_region)),
        "source_plain_jpeg": pa.array(plain, mask=missing),
    }
    for source_field in SOURCE_FIELDS:
        rows = rows.append_column(source_field, columns[source_field.name])
    return rows


def planned_images(rows: pa.Table) -> list[EncodedImage]:
    """The images `plan_crops` recorded for these crop rows, each with its rows (in this table) and region."""
    keys = rows.column("image_key").to_pylist()
    widths, heights = rows.column("image_width").to_pylist(), rows.column("image_height").to_pylist()
    regions = rows.column("source_region").to_pylist()
    plain = rows.column("source_plain_jpeg").to_pylist()
    images: dict[tuple, EncodedImage] = {}
    first = 0  # the chunk's first row in the table
    for number, chunk in enumerate(rows.column("source").chunks):
        encoded = chunk.dictionary
        # Each image's bytes as a zero-copy slice of the values buffer (an Arrow scalar per image costs ~0.15 ms).
        offsets = np.frombuffer(encoded.buffers()[1], np.int64)[encoded.offset:]
        data = encoded.buffers()[2]
        for row, index in enumerate(chunk.indices.fill_null(-1).to_numpy().tolist(), start=first):
            if index < 0:
                continue
            # Identical bytes of two images may share an entry: each image keeps its own region.
            image = images.get((number, index, keys[row]))
            if image is None:
                region = tuple(regions[row]) if regions[row] is not None else None
                image = images[(number, index, keys[row])] = EncodedImage(
                    data.slice(int(offsets[index]), int(offsets[index + 1] - offsets[index])),
                    (widths[row], heights[row]), plain[row], region=region)
            image.rows.append(row)
        first += len(chunk)
    return list(images.values())


def cut_on_device(rows: pa.Table, images: list[EncodedImage], device: torch.device, max_pixels: int,
                  decoder: PillowDecoder = PillowDecoder()) -> tuple[pa.Table, Pixels]:
    """Decode the images on `device` and return the rows (an image that fails to decode: one error row)
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
    """Replace the rows of images that failed to decode by one error row each (as the CPU croppers record them)."""
    keys = rows.column("image_key").to_pylist()
    firsts = [images[i].rows[0] for i in errors]
    failed_keys = {keys[row] for row in firsts}  # its box-failure rows go too: the image is one error now
    keep = [row for row in range(rows.num_rows) if keys[row] not in failed_keys]
    renumber = {row: j for j, row in enumerate(keep)}
    failed = fail_rows(rows.take(firsts), np.ones(len(firsts), bool), [e.stage for e in errors.values()],
                       [str(e) for e in errors.values()], whole_image=True)
    kept = [replace(image, rows=[renumber[r] for r in image.rows])
            for i, image in enumerate(images) if i not in errors]
    return pa.concat_tables([rows.take(keep), failed]), kept


def column_pixels(batch: pa.Table) -> Pixels:
    """The pixels of crop rows whose crops are their `crop` column."""
    crops = batch.column("crop")
    # combine_chunks copies even a single chunk.
    crops = crops.chunk(0) if crops.num_chunks == 1 else crops.combine_chunks()
    return functools.partial(crop_array, crops)


def crop_array(column: pa.BinaryArray, rows: list[int], input_size: tuple[int, int]) -> np.ndarray:
    """The crops of some rows of a binary column as one (N, H, W, 3) uint8 array.

    Consecutive rows (one expert's forward batch, no failed row among them) are a read-only
    view of the column's buffer: on a GPU host the copy of a large batch was a sixth of the
    actor's host time per batch (benchmarks/README.md).
    """
    width, height = input_size
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset :]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
    first, n = (rows[0] if rows else 0), len(rows)
    span = offsets[first : first + n + 1]
    if n and rows == list(range(first, first + n)) and np.all(np.diff(span) == width * height * 3):
        return data[span[0] : span[-1]].reshape(n, height, width, 3)
    out = np.empty((len(rows), height, width, 3), dtype=np.uint8)
    for j, i in enumerate(rows):
        out[j] = data[offsets[i] : offsets[i + 1]].reshape(height, width, 3)
    return out


def pairs(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<float32, 2> column as (N, 2); null rows read as NaN."""
    pairs = column.combine_chunks()
    values = pairs.values.slice(pairs.offset * 2, len(pairs) * 2)  # .values ignores the offset
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 2)


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


def _in_order(work, items, threads: int):
    """`work(*item)` for each item, results in order; with threads > 1 up to `threads` run at once.

    Pillow's decoder and numpy's large-array loops release the GIL, so a pose actor's otherwise
    idle cores decode and cut its next images in parallel. Items are drawn only as the window
    moves on; a decoded image lives only while its task runs, so at most `threads` at a time.
    """
    if threads <= 1:
        yield from (work(*item) for item in items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="crops") as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(work, *item))
            if len(window) >= 4 * threads:  # room to go on past a large photo
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


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
    """One image's rows: a crop or a failure per box, or one failure for the whole image.

    `data` is the image's bytes, or the ImageError reading them raised. The header comes first,
    then the boxes' geometry, then the pixels (`open_image`), which may be only those the crops read.
    """
    if task.get("error_stage"):
        out.failure(task, None, task["error_stage"], task["error_reason"])
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
        out.failure(task, None, exc.stage, str(exc))
        return
    size = header.size
    expected = (task["expected_width"], task["expected_height"])
    if None not in expected and expected != size:
        out.failure(task, None, "decode", f"image is {size[0]}x{size[1]} but the boxes file says {expected[0]}x{expected[1]}")
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
        out.failure(task, None, exc.stage, str(exc))
        return
    except Exception as exc:  # an unforeseen failure costs this image, never the batch
        out.clear()
        out.failure(task, None, "crop", f"{type(exc).__name__}: {exc}")
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
            "instance_index": index,
            "annotation_id": task["annotation_id"][index] if index is not None else None,
            "category": task["category"][index] if index is not None else None,
            "box_score": task["box_score"][index] if index is not None else None,
            "box_source": task["box_source"],
            "detector_id": task.get("detector_id"),
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

    def count(self) -> int:
        return len(self.crops)

    def finish_image(self, task: dict) -> None:
        """Stamp one image's rows with how many there are; an image with none gets one empty row."""
        if not self.crops:
            self._row(task, None, None, bbox=None, expert=None, center=None, scale=None, error_stage=None, error_reason=None)
            self.crops.append(None)
        self.columns["image_rows"] = [len(self.crops)] * len(self.crops)

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


def binary_column(values: list[np.ndarray | None], chunk_bytes: int = 2**31 - 1) -> pa.ChunkedArray:
    """uint8 arrays (None for a null) -> a binary column, each copied once into one buffer per chunk.

    `pa.array` of `tobytes()` copies each crop twice, which costs as much as cutting it
    (benchmarks/README.md). A chunk holds at most `chunk_bytes` (binary's offsets are int32).
    """
    chunks, start, size = [], 0, 0
    for end, value in enumerate(values + [None]):
        nbytes = 0 if value is None else value.nbytes
        if end == len(values) or (size + nbytes > chunk_bytes and end > start):
            part = values[start:end]
            valid = np.array([v is not None for v in part])
            offsets = np.zeros(len(part) + 1, dtype=np.int32)
            np.cumsum([0 if v is None else v.nbytes for v in part], out=offsets[1:])
            present = [v.reshape(-1) for v in part if v is not None]
            data = np.concatenate(present) if present else np.empty(0, np.uint8)
            bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if not valid.all() else None
            chunks.append(pa.Array.from_buffers(pa.binary(), len(part), [bitmap, pa.py_buffer(offsets), pa.py_buffer(data)]))
            start, size = end, 0
        size += nbytes
    return pa.chunked_array(chunks, pa.binary())


# Pillow keeps an image in 16 MiB blocks by default; one block per image (up to this size)
# lets `pixel_view` see it without a copy.
SINGLE_BLOCK_BYTES = 256 << 20


def pixel_view(image: Image.Image) -> np.ndarray | Image.Image:
    """An RGB image's pixels as a zero-copy (h, w, 4) RGBX view of Pillow's own buffer.

    `np.asarray(image)` repacks every pixel, which costs as much as decoding a large photo
    (benchmarks/README.md); Pillow's Arrow export does not. An image held in several blocks is returned as is.
    """
    if image.mode != "RGB":
        return image
    try:
        exported = pa.array(image)
    except ValueError:  # rows not contiguous: an image larger than one block
        return image
    width, height = image.size
    return np.frombuffer(exported.buffers()[-1], dtype=np.uint8)[: width * height * 4].reshape(height, width, 4)


def _single_block_images() -> None:
    if Image.core.get_block_size() < SINGLE_BLOCK_BYTES:
        Image.core.set_block_size(SINGLE_BLOCK_BYTES)
