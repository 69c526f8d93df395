"""A user's Dataset rows -> image tasks (`schema.IMAGE_TASK_SCHEMA`) with their bytes, for `raypose.annotate`.

A row holds its image as encoded bytes (a binary column: `ray.data.read_binary_files`, Parquet), a Hugging
Face style struct `{bytes, path}`, or a decoded array (`ray.data.read_images`: H x W [x C]), which is stored
as an uncompressed TIFF so that the crop stage decodes exactly those pixels. Its boxes are lists in the row
(COCO `[x, y, w, h]`, with optional categories, scores and annotation ids), filtered as a job's inline
boxes are; or the detector finds them. From here on a row is an image task like any job's: same crops, same failures as rows.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.errors import SpecError
from raypose.inputs.boxes import BoxSet, attach_boxes, inline_boxes
from raypose.inputs.containers import BOX_FIELDS, _inline_boxes
from raypose.schema import IMAGE_TASK_SCHEMA

PATH_COLUMN = "path"  # what read_images and read_binary_files(include_paths=True) call a row's file
ANNOTATION_ID_COLUMN = "annotation_id"  # a row's boxes' ids (a list as long as its boxes), kept in the output

Problems = dict[int, tuple[str, str]]  # row -> (stage, reason): rows whose image cannot be used


def image_tasks_of_rows(batch: pa.Table, *, images: ImagesSpec, boxes: BoxesSpec, working_dir: str = "/") -> pa.Table:
    """A batch of a user's rows -> image tasks with `image_bytes` set, in row order.

    `working_dir`: where the Dataset was made, which relative `path` values are relative to (a worker's own
    working directory is another).

    A row whose image cannot be used carries the reason (a `read` or `decode` failure of that image). A row
    with no box left after the filters is dropped, as a job skips images without boxes; with
    `boxes.source: detector` or `boxes.detect_missing` the detector looks at it instead.
    """
    n = batch.num_rows
    data, struct_paths, problems = image_bytes(batch, images.image_column)
    keys, uris = image_keys(batch, images, struct_paths, data, working_dir)
    # Rows meet their boxes by row number (zero-padded: key order is row order), so that the users'
    # keys need not be unique.
    listing = pa.table({"image_key": pa.array([f"{i:012d}" for i in range(n)], pa.string()),
                        "image_uri": pa.array(uris, pa.string())})
    box_set = BoxSet.empty("detector") if boxes.source == "detector" else inline_boxes(
        _with_boxes(listing, batch, boxes), boxes)
    detecting = boxes.detects
    tasks, _, _ = attach_boxes(listing, box_set, detect_missing=detecting)
    rows = pa.array([int(key) for key in tasks.column("image_key").to_pylist()], pa.int64())
    failed = [problems.get(row) for row in rows.to_pylist()]
    replaced = {  # the join's tasks (`schema.IMAGE_TASK_SCHEMA`) by row number: the rows' own keys and bytes back
        "image_key": pa.array(keys, pa.string()).take(rows),
        "image_bytes": data.take(rows),
        "error_stage": pa.array([f[0] if f else None for f in failed], pa.string()),
        "error_reason": pa.array([f[1] if f else None for f in failed], pa.string()),
        "shard": pa.repeat(pa.scalar(0, pa.int32()), len(rows)),
    }
    for name, values in replaced.items():
        tasks = tasks.set_column(tasks.schema.get_field_index(name), name, values)
    return tasks.cast(IMAGE_TASK_SCHEMA)


def image_bytes(batch: pa.Table, column: str) -> tuple[pa.Array, list[str | None] | None, Problems]:
    """The rows' encoded images (binary; null where a row has none), the paths of an HF-style struct if it
    has them, and the rows whose image cannot be used."""
    if column not in batch.column_names:
        raise SpecError(f"images.image_column: {column!r} is not a column of the Dataset "
                        f"(columns: {', '.join(batch.column_names)})")
    values = batch.column(column).combine_chunks()
    paths = None
    if pa.types.is_struct(values.type) and values.type.get_field_index("bytes") >= 0:
        if values.type.get_field_index("path") >= 0:
            paths = values.field("path").cast(pa.string()).to_pylist()
        values = values.field("bytes")
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        data = values.cast(pa.binary())
        missing = np.flatnonzero(~np.asarray(data.is_valid(), dtype=bool))
        return data, paths, {int(i): ("read", "no image in the row (null)") for i in missing}
    if isinstance(values.type, pa.ExtensionType) or pa.types.is_list(values.type) \
            or pa.types.is_fixed_size_list(values.type):
        data, problems = encoded_arrays(values)
        return data, paths, problems
    raise SpecError(f"images.image_column: {column!r} holds {values.type}; expected encoded image bytes, a struct "
                    "with `bytes` (and `path`), or image arrays (ray.data.read_images)")


def encoded_arrays(values: pa.Array) -> tuple[pa.Array, Problems]:
    """Decoded images (H x W [x C] arrays: Ray's tensor columns, or nested lists) -> uncompressed TIFFs."""
    from PIL import Image

    arrays = values.to_numpy(zero_copy_only=False)
    encoded: list[bytes | None] = []
    problems: Problems = {}
    for row, pixels in enumerate(arrays):
        if pixels is None:
            encoded.append(None)
            problems[row] = ("read", "no image in the row (null)")
            continue
        try:
            buffer = io.BytesIO()
            Image.fromarray(_dense(pixels)).save(buffer, format="TIFF")
            encoded.append(buffer.getvalue())
        except Exception as exc:  # an array that is no image costs its row, not the batch
            encoded.append(None)
            problems[row] = ("decode", f"not an image array ({getattr(pixels, 'shape', '?')}, "
                                       f"{getattr(pixels, 'dtype', '?')}): {type(exc).__name__}: {exc}")
    return pa.array(encoded, pa.binary()), problems


def _dense(pixels: Any) -> np.ndarray:
    """One image's pixels as a contiguous array (nested lists of a list column become one array)."""
    if isinstance(pixels, np.ndarray) and pixels.dtype == object:
        pixels = np.stack([_dense(row) for row in pixels])
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.dtype.kind in "iu" and pixels.dtype not in (np.uint8, np.uint16) and pixels.size \
            and 0 <= pixels.min() and pixels.max() <= 255:
        pixels = pixels.astype(np.uint8)  # 8-bit pixels that came as lists of Python ints
    return pixels


def image_keys(batch: pa.Table, images: ImagesSpec, struct_paths: list[str | None] | None, data: pa.Array,
               working_dir: str = "/") -> tuple[list[str], list[str | None]]:
    """Each row's image key and URI.

    The key is `images.key_column`'s value, else the image struct's `path`, else the `path` column's (made
    relative to `images.path` when it is under it, as a job's keys are), else a hash of the image's bytes.
    The URI is where the row's file is, when a `path` column says; else null.
    """
    n = batch.num_rows
    files = None
    if PATH_COLUMN in batch.column_names:
        files = [path if not path or "://" in path else os.path.normpath(os.path.join(working_dir, path))
                 for path in batch.column(PATH_COLUMN).cast(pa.string()).to_pylist()]
    uris = [_uri(path) if path else None for path in files] if files else [None] * n
    if images.key_column:
        if images.key_column not in batch.column_names:
            raise SpecError(f"images.key_column: {images.key_column!r} is not a column of the Dataset "
                            f"(columns: {', '.join(batch.column_names)})")
        named = batch.column(images.key_column).cast(pa.string()).to_pylist()
    elif struct_paths is not None:
        named = [posixpath.normpath(p) if p else None for p in struct_paths]
    elif files is not None:
        named = [_relative(path, images.path) if path else None for path in files]
    else:
        named = [None] * n
    keys = [key if key else _digest(data[i].as_py()) for i, key in enumerate(named)]
    return keys, uris


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    bare = path.split("://", 1)[-1]
    bare_root = root.split("://", 1)[-1]
    return bare[len(bare_root):] if bare.startswith(bare_root) else path


def _uri(path: str) -> str:
    return path if "://" in path else f"file://{path}"


def _digest(data: bytes | None) -> str:
    return "sha1:" + hashlib.sha1(data or b"").hexdigest()[:16]


def _with_boxes(listing: pa.Table, batch: pa.Table, boxes: BoxesSpec) -> pa.Table:
    """The listing with each row's boxes, categories and scores as lists of equal length (`inline_boxes` takes)."""
    if boxes.bbox_column not in batch.column_names and not boxes.detect_missing:
        raise SpecError(f"boxes.bbox_column: {boxes.bbox_column!r} is not a column of the Dataset "
                        f"(columns: {', '.join(batch.column_names)}); or give boxes.source: detector")
    columns = [name if name in batch.column_names else None
               for name in (boxes.bbox_column, boxes.category_column, boxes.score_column, ANNOTATION_ID_COLUMN)]
    values = [batch.column(name).to_pylist() if name else [None] * batch.num_rows for name in columns]
    bbox, category, score, annotation_id = [], [], [], []
    for *record, ids in zip(*values):
        row = _inline_boxes(dict(zip(BOX_FIELDS, record)), boxes, named=False)
        bbox.append([_numbers(box) for box in row["bbox"]])
        category.append([None if c is None else str(c) for c in row["category"]])
        score.append([_or_none(float, v) for v in row["score"]])
        ids = ids if isinstance(ids, (list, tuple)) and len(ids) == len(row["bbox"]) else [None] * len(row["bbox"])
        annotation_id.append([_or_none(int, v) for v in ids])
    return listing.append_column("bbox", pa.array(bbox, pa.list_(pa.list_(pa.float64())))) \
        .append_column("category", pa.array(category, pa.list_(pa.string()))) \
        .append_column("score", pa.array(score, pa.list_(pa.float32()))) \
        .append_column("annotation_id", pa.array(annotation_id, pa.list_(pa.int64())))


def _or_none(kind: type, value: Any) -> Any:
    """`kind(value)`, or None for what is not one (a box's score or id the row got wrong)."""
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None


def _numbers(box: Any) -> list[float]:
    """A box's numbers; what is not a list of numbers becomes NaN, reported as that box's failure later."""
    try:
        return [float(v) for v in box]
    except (TypeError, ValueError):
        return [math.nan] * 4
