"""The crops: box -> center/scale -> UDP affine crop at the model's input size, and the CPU stage.

The geometry is transformers' VitPoseImageProcessor (mmpose's top-down UDP pipeline):
padding 1.25, box aspect fixed to the model input's, scale in units of 200 px, and a
warp that maps the box onto the crop's pixel centres 0..W-1 / 0..H-1.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from raypose.boxes import clip_boxes
from raypose.faults import inject
from raypose.reader import ImageError, decode_image_reduced, probe_image, read_cropped_image
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


def bilinear_taps(points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampling points along one axis of `size` pixels -> the lower and upper pixel each blends and
    the upper one's float32 weight; points beyond the ends take the end pixel (the border is zeroed apart)."""
    clipped = np.clip(points, 0, size - 1)
    lower = np.floor(clipped).astype(np.intp)
    return lower, np.minimum(lower + 1, size - 1), (clipped - lower).astype(np.float32)


def crop_image(
    image: np.ndarray | Image.Image,
    center: np.ndarray,
    scale: np.ndarray,
    input_size: tuple[int, int],
    *,
    reduction: int = 1,
    full_size: tuple[int, int] | None = None,
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
    """
    xs, ys = crop_sampling_grid(center, scale, input_size)
    if isinstance(image, Image.Image):
        w, h = image.size
    else:
        h, w = image.shape[:2]
    full_w, full_h = full_size or (w, h)
    outside_x = (xs < 0) | (xs > full_w - 1)
    outside_y = (ys < 0) | (ys > full_h - 1)
    if reduction != 1:
        xs = (xs - (reduction - 1) / 2) / reduction
        ys = (ys - (reduction - 1) / 2) / reduction
    x0, x1, wx = bilinear_taps(xs, w)
    y0, y1, wy = bilinear_taps(ys, h)
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


# Pillow keeps an image in 16 MiB blocks by default; one block per image (up to this size)
# lets `pixel_view` see it without a copy.
SINGLE_BLOCK_BYTES = 256 << 20


def pixel_view(image: Image.Image) -> np.ndarray | Image.Image:
    """An RGB image's pixels as a zero-copy (h, w, 4) RGBX view of Pillow's own buffer.

    `np.asarray(image)` repacks every pixel (~70 ms for 12 Mpx, as much as decoding it);
    Pillow's Arrow export does not. An image held in several blocks is returned as is.
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


@dataclass
class PendingImage:
    """An image whose crops are cut on the pose device (`device_crops.cut_crops`), not here."""

    data: bytes | pa.Buffer  # the encoded image
    size: tuple[int, int]  # (width, height) after EXIF orientation, from the header
    plain_jpeg: bool  # a GPU JPEG decoder can take it as it is (`reader.probe_image`)
    rows: list[int] = field(default_factory=list)  # its crop rows in `plan_crops`' table


def make_crops(
    batch: pa.Table,
    *,
    input_sizes: dict[str, tuple[int, int]],
    routes: dict[str, str],
    default_expert: str,
    storage_options: dict[str, Any],
    max_pixels: int,
    jpeg_draft: bool = False,
    image_column: str = "image",
    threads: int = 1,
) -> pa.Table:
    """CPU stage: image rows with boxes -> one row per crop (or per failure), see `table.CROP_SCHEMA`.

    Each box goes to the expert its category routes to (`routes`, else `default_expert`) and is
    cropped at that expert's input size (width, height).

    `jpeg_draft`: decode each JPEG at the largest DCT reduction (1/2, 1/4, 1/8) that every
    crop of the image still samples at no more than one point per decoded pixel
    (`jpeg_reduction`). Much less decoding and copying for large photos with large people;
    the crops' geometry is unchanged but their pixels are block means, not the reference's
    point samples (benchmarks/README.md gives the measured difference). `images.jpeg_draft`, off
    by default.

    `threads` > 1 decodes and cuts that many images at a time (the pose actor's cores).
    """
    return _crop_rows(batch, input_sizes, routes, default_expert, storage_options, max_pixels, jpeg_draft,
                      image_column, pending=None, threads=threads)


def plan_crops(
    batch: pa.Table,
    *,
    input_sizes: dict[str, tuple[int, int]],
    routes: dict[str, str],
    default_expert: str,
    storage_options: dict[str, Any],
    max_pixels: int,
    image_column: str = "image",
) -> tuple[pa.Table, list[PendingImage]]:
    """`make_crops` without the pixels: the rows, with an empty `crop`, and the images to cut them from.

    Only image headers are read here; the decode and the crops happen on the pose device.
    """
    pending: list[PendingImage] = []
    table = _crop_rows(batch, input_sizes, routes, default_expert, storage_options, max_pixels, False,
                       image_column, pending=pending)
    return table, pending


def _crop_rows(batch, input_sizes, routes, default_expert, storage_options, max_pixels, jpeg_draft, image_column,
               pending: list[PendingImage] | None, threads: int = 1) -> pa.Table:
    inject("crop")
    _single_block_images()
    containers: dict = {}  # the Parquet file being read, shared by its images in this batch

    def image_rows(task: dict, data) -> _CropRows:
        rows = _CropRows()
        _crop_task(task, data, rows, input_sizes, routes, default_expert, max_pixels, jpeg_draft, pending is not None)
        rows.finish_image(task)
        return rows

    # The reads happen here, in order, never in the pool: the container cache is not thread-safe.
    reads = ((task, read_cropped_image(task, storage_options, image_column, containers)) for task in _tasks(batch))
    out = _CropRows()
    for rows in _in_order(image_rows, reads, threads):
        if rows.pending is not None:
            rows.pending.rows = [out.count() + row for row in rows.pending.rows]
            pending.append(rows.pending)
        out.extend(rows)
    return out.table(CROP_SCHEMA)


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


def _crop_task(task, data, out, input_sizes, routes, default_expert, max_pixels, jpeg_draft, planned: bool) -> None:
    """One image's rows: a crop or a failure per box, or one failure for the whole image.

    `data` is the image's bytes, or the ImageError reading them raised; `planned`: the crops
    are left to the pose device (`out.pending`).
    """
    if task.get("error_stage"):
        out.failure(task, None, task["error_stage"], task["error_reason"])
        return
    if not task["box_xywh"]:
        return  # nothing to label (e.g. nothing detected): finish_image records the image
    experts = [routes.get(c, default_expert) if c is not None else default_expert for c in task["category"]]
    try:
        if isinstance(data, ImageError):
            raise data
        if not planned:
            reduction = _reduction_for(task["box_xywh"], [input_sizes.get(e) for e in experts]) if jpeg_draft else None
            decoded, factor, full_size = decode_image_reduced(data, max_pixels, reduction)
            image = None
        else:
            full_size, plain_jpeg = probe_image(data, max_pixels)
            decoded, factor, image = None, 1, PendingImage(data, full_size, plain_jpeg)
    except ImageError as exc:
        out.failure(task, None, exc.stage, str(exc))
        return
    try:
        _crop_boxes(task, decoded, factor, full_size, experts, input_sizes, out, image)
    except Exception as exc:  # an unforeseen failure costs this image, never the batch
        out.clear()
        out.failure(task, None, "crop", f"{type(exc).__name__}: {exc}")
        return
    if image is not None and image.rows:
        out.pending = image


def _reduction_for(boxes: list, sizes: list[tuple[int, int] | None]):
    """The `decode_image_reduced` callback: the image's size -> its crops' JPEG reduction."""

    def reduction(image_size: tuple[int, int]) -> int:
        clipped, reasons = clip_boxes(np.asarray(boxes, dtype=np.float64), *image_size)
        if any(size is None for size in sizes):
            return 1  # a box routed to an unknown expert fails later, in the crop stage's own way
        geometry = _box_geometry(clipped, {i: sizes[i] for i, reason in enumerate(reasons) if reason is None})
        usable = sorted(geometry)
        scales = [geometry[i][1] for i in usable]
        return jpeg_reduction(np.array(scales).reshape(-1, 2), [sizes[i] for i in usable])

    return reduction


def _box_geometry(clipped: np.ndarray, sizes: dict[int, tuple[int, int]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Box index -> its crop's center and scale at the input size `sizes` gives it, one
    `center_scale_from_boxes` per input size (once per box, `plan_crops` took 0.66 ms per
    benchmark image instead of 0.61)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in sizes.items():
        groups.setdefault(tuple(size), []).append(index)
    geometry = {}
    for size, group in groups.items():
        centers, scales = center_scale_from_boxes(clipped[group], size)
        geometry.update(zip(group, zip(centers, scales)))
    return geometry


def _crop_boxes(
    task: dict, decoded: Image.Image | None, factor: int, size: tuple[int, int], experts: list[str],
    input_sizes: dict, out: "_CropRows", pending: PendingImage | None = None,
) -> None:
    """The image's box rows; each crop is cut from `decoded`, or left to the device (`pending`)."""
    expected = (task["expected_width"], task["expected_height"])
    if None not in expected and expected != size:
        out.failure(task, None, "decode", f"image is {size[0]}x{size[1]} but the boxes file says {expected[0]}x{expected[1]}")
        return
    clipped, reasons = clip_boxes(np.asarray(task["box_xywh"], dtype=np.float64), *size)
    geometry = _box_geometry(clipped, {i: input_sizes[e] for i, (r, e) in enumerate(zip(reasons, experts)) if r is None})
    source = pixel_view(decoded) if decoded is not None else None
    for index, (reason, expert) in enumerate(zip(reasons, experts)):
        if reason is not None:
            out.failure(task, index, "boxes", reason, size)
            continue
        center, scale = geometry[index]
        if pending is not None:
            pending.rows.append(out.count())
            crop = None
        else:
            crop = crop_image(source, center, scale, input_sizes[expert], reduction=factor, full_size=size)
        out.crop(task, index, size, clipped[index], expert, center, scale, crop)


class _CropRows:
    """Column buffers for the crop stage's output."""

    def __init__(self):
        self.columns: dict[str, list] = {}
        self.crops: list[np.ndarray | None] = []
        self.pending: PendingImage | None = None  # one image's rows: the image the device cuts them from

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

    `pa.array` of `tobytes()` copies each crop twice (~1 ms per 256x192 crop, as much as cutting
    it). A chunk holds at most `chunk_bytes` (binary's offsets are int32).
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
