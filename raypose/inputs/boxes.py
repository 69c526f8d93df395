"""The boxes: load them (COCO JSON, a box table, or inline with the images) and join them to the listed images.

Everything is columnar: the boxes are one Arrow table (`schema.BOX_SCHEMA`, one row per box, in
file order), filtered with Arrow compute and grouped per image, and the join with the listing is
an Arrow join, so a plan of millions of images holds no Python object per image or box.
"""

from __future__ import annotations

import bisect
import json
import math
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from raypose.config.spec import BoxesSpec
from raypose.errors import SpecError
from raypose.inputs.arrays import KeySequence, ascending, filtered
from raypose.inputs.storage import with_retries
from raypose.schema import BOX_SCHEMA, ERRORS_SCHEMA, IMAGE_TASK_SCHEMA


@dataclass
class BoxSet:
    """The job's boxes: one row per image, sorted by key, its boxes' columns as lists in file order
    (`_per_image`); and how many the filters dropped."""

    table: pa.Table
    source: str  # gt | table | inline | detector
    dropped: int = 0

    @classmethod
    def of_rows(cls, rows: pa.Table, source: str, dropped: int = 0) -> BoxSet:
        """The boxes of a table with one row per box (`schema.BOX_SCHEMA`), grouped by image."""
        # Grouped as soon as read: the per-box keys (most of a box table's bytes) are not kept.
        return cls(_per_image(rows), source, dropped)

    @classmethod
    def empty(cls, source: str) -> BoxSet:
        return cls.of_rows(BOX_SCHEMA.empty_table(), source)

    def image(self, key: str) -> dict[str, Any]:
        """One image's boxes: lists of bbox, annotation_id, category, score; the expected_width/height the file gives."""
        rows = self.table.filter(pc.equal(self.table.column("image_key"), key)).to_pylist()
        if not rows:
            return {**{name: [] for name in PER_IMAGE_LISTS}, "expected_width": None, "expected_height": None}
        rows[0].pop("image_key")
        return rows[0]


def load_boxes(boxes: BoxesSpec, storage_options: dict[str, Any]) -> BoxSet:
    """Load the job's boxes from a COCO annotations JSON or a Parquet/JSONL box table."""
    try:
        fs, path = url_to_fs(boxes.path, **with_retries(boxes.path, storage_options))
        if not fs.isfile(path):
            raise SpecError(f"boxes.path: {boxes.path} does not exist")
        # A COCO file is one JSON document; a table is read from the file a chunk at a time.
        source = fs.cat_file(path) if boxes.source == "coco" else fs.open(path, "rb")
    except SpecError:
        raise
    except Exception as exc:  # any filesystem's failure (permissions, network) ends here
        raise SpecError(f"boxes.path: cannot read {boxes.path}: {type(exc).__name__}: {exc}") from exc
    if boxes.source == "coco":
        return coco_boxes(_json(source, boxes.path), boxes)
    with source:
        table, dropped = _grouped_by_image(_box_table_chunks(source, boxes.path, boxes), boxes)
    return BoxSet(table, source="table", dropped=dropped)


def _grouped_by_image(chunks, boxes: BoxesSpec) -> tuple[pa.Table, int]:
    """A box table read in chunks, filtered and grouped by image (`_per_image`); and how many boxes the filters dropped.

    While the rows come sorted by key (as a detector writes them) each chunk is grouped as it is read, the
    image at its end carried into the next, so the per-box keys (most of a box table's bytes) are never all
    held, and nothing is concatenated. Unsorted rows are all gathered and grouped at the end.
    """
    grouped: list[pa.Table] = []  # per-image tables, in key order
    rows: list[pa.Table] = []  # with unsorted rows: all of them
    carried = None  # the rows of the last image so far, which the next chunk may go on with
    dropped = 0
    for chunk in chunks:
        kept, chunk_dropped = _filtered_rows(chunk, boxes)
        dropped += chunk_dropped
        if rows:
            rows.append(kept)
            continue
        if carried is not None:
            kept = pa.concat_tables([carried, kept]).combine_chunks()
        keys = _contiguous(kept.column("image_key"))
        after_grouped = not grouped or not len(keys) or keys[0].as_py() > grouped[-1].column("image_key")[-1].as_py()
        if not (after_grouped and ascending(keys)):
            rows = [*(_flattened(part) for part in grouped), kept]
            grouped, carried = [], None
            continue
        last = len(keys) - (pc.index(keys, keys[-1]).as_py() if len(keys) else 0)  # rows of the last key
        carried = kept.slice(len(keys) - last)
        if len(keys) > last:
            grouped.append(_per_image(kept.slice(0, len(keys) - last)))
    if rows:
        return _per_image(pa.concat_tables(rows).combine_chunks()), dropped
    if carried is not None and carried.num_rows:
        grouped.append(_per_image(carried))
    return (pa.concat_tables(grouped) if grouped else _per_image(BOX_SCHEMA.empty_table())), dropped


def _flattened(per_image: pa.Table) -> pa.Table:
    """Per-image boxes back to one row per box (`schema.BOX_SCHEMA`), in the same order."""
    rows = _one_row_per_box(per_image, PER_IMAGE_LISTS, ("image_key", "expected_width", "expected_height"))
    return rows.select(BOX_SCHEMA.names).cast(BOX_SCHEMA)


def _one_row_per_box(table: pa.Table, lists: tuple[str, ...], repeated: tuple[str, ...]) -> pa.Table:
    """A table of per-image box lists (`lists`, aligned with `bbox`) as one row per box, each row's
    `repeated` columns copied onto its boxes."""
    parents = pc.list_parent_indices(table.column("bbox"))
    return pa.table({**{name: table.column(name).take(parents) for name in repeated},
                     **{name: pc.list_flatten(table.column(name)) for name in lists}})


def coco_boxes(coco: Any, boxes: BoxesSpec) -> BoxSet:
    """Boxes from a COCO annotations dict (instances or person_keypoints)."""
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise SpecError(
            f"boxes.path: {boxes.path} is not a COCO annotations file (needs 'images' and 'annotations'); "
            "for a detections list use boxes.source: table with image keys"
        )
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    wanted = _category_ids(names, boxes)
    images = {}
    for image in coco["images"]:
        key = posixpath.normpath(str(image["file_name"])) if image.get("file_name") else None
        if key is None:
            raise SpecError(f"boxes.path: image id {image.get('id')} has no file_name")
        images[image["id"]] = (key, image.get("width"), image.get("height"))
    columns: dict[str, list] = {name: [] for name in BOX_SCHEMA.names}
    dropped = 0
    for ann in coco["annotations"]:
        bbox = ann.get("bbox")
        keep = (
            ann.get("image_id") in images
            and (wanted is None or ann.get("category_id") in wanted)
            and (boxes.include_crowd or not ann.get("iscrowd", 0))
            and bbox is not None
            and not (_usable(bbox) and _area(ann) < boxes.min_area)  # broken boxes go on, to be reported
        )
        if not keep:
            dropped += 1
            continue
        key, width, height = images[ann["image_id"]]
        for name, value in (("image_key", key), ("bbox", _xywh(bbox)), ("annotation_id", ann.get("id")),
                            ("category", names.get(ann.get("category_id"))), ("score", None),
                            ("expected_width", width), ("expected_height", height)):
            columns[name].append(value)
    return BoxSet.of_rows(pa.table(columns, schema=BOX_SCHEMA), source="gt", dropped=dropped)


def table_boxes(table: pa.Table, boxes: BoxesSpec, source: str = "table") -> BoxSet:
    """Boxes from a table with one row per box: image key, COCO xywh [, score, category, annotation_id]."""
    rows, dropped = _filtered_rows(table, boxes)
    return BoxSet.of_rows(rows, source=source, dropped=dropped)


def _filtered_rows(table: pa.Table, boxes: BoxesSpec) -> tuple[pa.Table, int]:
    """A box table's rows as `schema.BOX_SCHEMA`, less those the filters drop; and how many they dropped."""
    _check_columns(table.column_names, boxes)
    n = table.num_rows
    keys = _normalised_keys(table.column(boxes.image_key_column))
    bbox, bbox_valid = _xywh_column(table.column(boxes.bbox_column), boxes)
    score = _optional(table, boxes.score_column, pa.float32(), n)
    category = _optional(table, boxes.category_column, pa.string(), n)
    keep = np.asarray(keys.is_valid()) & bbox_valid
    wanted = set(boxes.categories) if boxes.categories is not None else None
    if wanted is not None:
        keep &= np.asarray(pc.or_(pc.is_null(category), pc.is_in(category, pa.array(sorted(wanted)))))
    keep &= np.asarray(pc.fill_null(pc.greater_equal(score, pc.cast(boxes.min_score, pa.float32())), True))
    xywh = bbox.values.to_numpy(zero_copy_only=False).reshape(-1, 4)
    usable = np.isfinite(xywh).all(axis=1) & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    with np.errstate(invalid="ignore"):
        keep &= ~(usable & (xywh[:, 2] * xywh[:, 3] < boxes.min_area))  # broken boxes go on, to be reported
    default = (boxes.categories or [None])[0]
    result = pa.table({
        "image_key": keys, "bbox": bbox,
        "annotation_id": _optional(table, "annotation_id", pa.int64(), n),
        "category": pc.fill_null(category, default) if default is not None else category,
        "score": score, "expected_width": pa.nulls(n, pa.int32()), "expected_height": pa.nulls(n, pa.int32()),
    }, schema=BOX_SCHEMA)
    result = filtered(result, pa.array(keep))
    return result, n - result.num_rows


def attach_boxes(
    images: pa.Table, box_set: BoxSet, detect_missing: bool = False
) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Join listed images with their boxes.

    Returns the image tasks (images that have boxes, and with `detect_missing` the others
    too, marked for the detector), sorted by key, an errors table for boxes whose image is not
    in storage, and counts.
    """
    per_image = box_set.table
    listed = images.select([c for c in ("image_key", "image_uri", "container", "offset", "length")
                            if c in images.column_names])
    # The join, by index: Arrow's own join takes no nested columns such as the boxes' lists.
    where = _rows_with_boxes(_contiguous(listed.column("image_key")), per_image.column("image_key"))
    has_boxes = where.is_valid()
    picked = where.filter(has_boxes)
    in_order = len(picked) == per_image.num_rows and pc.all(pc.equal(picked, pa.array(
        np.arange(len(picked), dtype=np.int64)))).as_py() is not False
    # Every image with boxes listed (the usual case): its boxes are per_image as it is, no copy.
    matched = _joined(filtered(listed, has_boxes), per_image if in_order else per_image.take(picked))
    without = filtered(listed, pc.invert(has_boxes))
    unmatched = np.ones(per_image.num_rows, bool)
    unmatched[np.asarray(picked)] = False  # the join's own indices: no second hash of the keys
    missing = filtered(per_image, pa.array(unmatched))
    if per_image.num_rows and not matched.num_rows:
        raise SpecError(
            f"boxes.path: no box belongs to a listed image: image keys look like "
            f"{images.column('image_key')[0].as_py()!r}, the boxes file names {box_set.table.column('image_key')[0].as_py()!r}; "
            "point images.path at the folder the boxes' file names are relative to"
        )
    tasks = _tasks(matched, box_set.source, detect=False)  # in listing order: sorted by key
    if detect_missing:
        tasks = pa.concat_tables([tasks, _tasks(without, None, detect=True)]).sort_by("image_key")
    boxes_in = (lambda t: int(pc.sum(pc.list_value_length(t.column("bbox"))).as_py() or 0) if t.num_rows else 0)
    counts = {
        "images_listed": images.num_rows,
        "images": tasks.num_rows,  # sent to the pipeline
        "images_with_boxes": matched.num_rows,
        "images_without_boxes": without.num_rows,
        "images_to_detect": without.num_rows if detect_missing else 0,
        "boxes": boxes_in(matched),
        "boxes_dropped_by_filters": box_set.dropped,
        "boxes_without_image": boxes_in(missing),
    }
    return tasks, _listing_errors(missing.column("image_key")), counts


def _rows_with_boxes(listed: pa.Array, grouped: pa.ChunkedArray) -> pa.Array:
    """For each listed key, the row of the per-image boxes (keys `grouped`, sorted) that holds its boxes, or null.

    With the listing sorted too, each chunk of boxes is matched against the listed keys in its key range
    alone: the hash table is a chunk's, not the job's (at 1M images that one is ~0.1 GiB).
    """
    if not ascending(listed):
        return pc.index_in(listed, grouped.combine_chunks()).cast(pa.int64())
    at = KeySequence(listed)
    where = np.full(len(listed), -1, np.int64)
    start = 0
    for chunk in grouped.chunks:
        if len(chunk):
            lo, hi = bisect.bisect_left(at, chunk[0].as_py()), bisect.bisect_right(at, chunk[-1].as_py())
            found = pc.index_in(listed.slice(lo, hi - lo), chunk)
            where[lo:hi] = np.where(np.asarray(found.is_valid()), np.asarray(found.fill_null(0), np.int64) + start, -1)
        start += len(chunk)
    return pa.array(where, mask=where < 0)


def _joined(listed: pa.Table, boxes: pa.Table) -> pa.Table:
    """Listed images and their per-image boxes, row for row."""
    for name in boxes.column_names:
        if name != "image_key":
            listed = listed.append_column(name, boxes.column(name))
    return listed


def _contiguous(column: pa.ChunkedArray) -> pa.Array:
    """One array of a column; a single chunk as it is (`combine_chunks` would copy it: 0.3 GiB at 3M boxes)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _per_image(boxes: pa.Table) -> pa.Table:
    """One row per image: its boxes' columns as lists (file order kept), and the size the file gives it."""
    keys = _contiguous(boxes.column("image_key"))
    if not ascending(keys):
        boxes = boxes.take(pc.sort_indices(boxes, [("image_key", "ascending")]))  # a stable sort
        keys = _contiguous(boxes.column("image_key"))
    ordered = boxes
    if not len(keys):
        empty = {name: pa.array([], pa.list_(BOX_SCHEMA.field(name).type)) for name in PER_IMAGE_LISTS}
        return pa.table({"image_key": pa.array([], pa.string()), **empty,
                         "expected_width": pa.array([], pa.int32()), "expected_height": pa.array([], pa.int32())})
    runs = pc.run_end_encode(keys)
    ends = np.asarray(runs.run_ends)
    offsets = pa.array(np.concatenate([[0], ends]).astype(np.int32))
    columns = {"image_key": runs.values}
    for name in PER_IMAGE_LISTS:
        columns[name] = pa.ListArray.from_arrays(offsets, _contiguous(ordered.column(name)))
    for name in ("expected_width", "expected_height"):
        sizes = np.asarray(_contiguous(pc.fill_null(ordered.column(name), -1)), np.int64)
        largest = np.maximum.reduceat(sizes, np.concatenate([[0], ends[:-1]]))
        columns[name] = pa.array(largest, pa.int32(), mask=largest < 0)
    return pa.table(columns)


PER_IMAGE_LISTS = ("bbox", "annotation_id", "category", "score")


def _tasks(rows: pa.Table, source: str | None, detect: bool) -> pa.Table:
    """Image tasks (`schema.IMAGE_TASK_SCHEMA`) for joined rows; `detect`: rows without boxes, for the detector."""
    n = rows.num_rows
    columns = {name: (rows.column(name) if name in rows.column_names else pa.nulls(n, IMAGE_TASK_SCHEMA.field(name).type))
               for name in ("image_key", "image_uri", "container", "offset", "length")}
    if detect:
        no_boxes = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.null()))
        columns.update({name: no_boxes.cast(IMAGE_TASK_SCHEMA.field(name).type)
                        for name in ("box_xywh", "annotation_id", "category", "box_score")})
    else:
        columns.update(box_xywh=rows.column("bbox"), annotation_id=rows.column("annotation_id"),
                       category=rows.column("category"), box_score=rows.column("score"),
                       expected_width=rows.column("expected_width"), expected_height=rows.column("expected_height"))
    columns["box_source"] = pa.repeat(pa.scalar(source, pa.string()), n)
    columns["needs_detection"] = pa.repeat(pa.scalar(detect), n)
    return pa.table({name: columns.get(name, pa.nulls(n, IMAGE_TASK_SCHEMA.field(name).type))
                     for name in IMAGE_TASK_SCHEMA.names}).cast(IMAGE_TASK_SCHEMA)


def _listing_errors(missing) -> pa.Table:
    """Errors-table rows for images the boxes file names but the listing does not have."""
    n = len(missing)
    return pa.table({
        "job_id": pa.nulls(n, pa.string()), "image_key": missing, "image_uri": pa.nulls(n, pa.string()),
        "instance_index": pa.nulls(n, pa.int32()), "stage": ["list"] * n,
        "reason": ["listed in the boxes file but not found under images.path"] * n,
    }, schema=ERRORS_SCHEMA)


def inline_boxes(images: pa.Table, boxes: BoxesSpec) -> BoxSet:
    """Boxes that came with the images (WebDataset .json members, Parquet columns), filtered like a table's;
    their annotation ids too where the images have an `annotation_id` list column (a Dataset's rows)."""
    lists = ("bbox", "category", "score") + (("annotation_id",) if "annotation_id" in images.column_names else ())
    exploded = _one_row_per_box(images, lists, ("image_key",))
    spec = boxes.model_copy(update={"image_key_column": "image_key", "bbox_column": "bbox",
                                    "category_column": "category", "score_column": "score"})
    return table_boxes(exploded, spec, source="inline")


def _check_columns(names: list[str], boxes: BoxesSpec) -> None:
    for column, field in ((boxes.image_key_column, "boxes.image_key_column"), (boxes.bbox_column, "boxes.bbox_column")):
        if column not in names:
            raise SpecError(f"{field}: column {column!r} is not in {boxes.path} (columns: {', '.join(names)})")


def _normalised_keys(column) -> pa.Array:
    """Image keys as strings with `posixpath.normpath` applied (in Python only to the keys it changes)."""
    keys = pc.cast(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column, pa.string())
    changes = np.asarray(pc.fill_null(pc.match_substring_regex(keys, NORMPATH_CHANGES), False))
    if not changes.any():
        return keys
    at = np.flatnonzero(changes)
    fixed = [posixpath.normpath(k) for k in keys.take(pa.array(at)).to_pylist()]
    return pc.replace_with_mask(keys, pa.array(changes), pa.array(fixed, pa.string()))


# What posixpath.normpath would change: "." or ".." parts, doubled or trailing slashes, an empty key.
NORMPATH_CHANGES = r"(^|/)\.\.?(/|$)|//|/$|^$"


def _xywh_column(column, boxes: BoxesSpec) -> tuple[pa.FixedSizeListArray, np.ndarray]:
    """Always four float64 numbers a box: a short or malformed bbox becomes NaN, reported per box by
    geometry.clip_boxes, instead of a ragged list that fails the whole image-task table; and which rows had one."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    out = np.full((n, 4), np.nan)
    valid = np.asarray(column.is_valid()) if n else np.zeros(0, bool)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        lists = column.cast(pa.list_(column.type.value_type)) if pa.types.is_fixed_size_list(column.type) else column
        try:
            values = pc.cast(lists.values, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = np.array([_number(v) for v in lists.values.to_pylist()], np.float64)
        offsets = np.asarray(lists.offsets)
        lengths = np.where(valid, np.minimum(np.diff(offsets), 4), 0)
        for k in range(4):
            has = lengths > k
            out[has, k] = values[offsets[:-1][has] + k]
    elif n:
        raise SpecError(f"{'boxes.bbox_column'}: {boxes.bbox_column!r} in {boxes.path} is not a list of numbers "
                        f"(it holds {column.type})")
    return pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1), pa.float64()), 4), valid


def _optional(table: pa.Table, name: str, kind: pa.DataType, n: int) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(n, kind)
    column = table.column(name)
    return pc.cast(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column, kind)


def _category_ids(names: dict[int, str], boxes: BoxesSpec) -> set[int] | None:
    if boxes.categories is None:
        return None
    by_name = defaultdict(set)
    for cid, name in names.items():
        by_name[name].add(cid)
    unknown = [c for c in boxes.categories if c not in by_name]
    if unknown:
        raise SpecError(
            f"boxes.categories: {', '.join(map(repr, unknown))} not in {boxes.path} "
            f"(it has: {', '.join(sorted(by_name)) or 'no categories'})"
        )
    return set().union(*(by_name[c] for c in boxes.categories))


def _area(ann: dict) -> float:
    if "area" in ann and not ann.get("iscrowd", 0):
        return float(ann["area"])
    return _box_area(ann.get("bbox") or [0, 0, 0, 0])


def _box_area(bbox) -> float:
    try:
        return float(bbox[2]) * float(bbox[3])
    except (TypeError, ValueError, IndexError):
        return math.nan


def _usable(bbox: Any) -> bool:
    """Four finite numbers with a positive width and height; the area filter applies to these only.

    A NaN, negative or zero-size box is not filtered away but kept, to become an error row.
    """
    x, y, w, h = _xywh(bbox)
    return all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _xywh(bbox: Any) -> list[float]:
    # Always four numbers: a short or malformed bbox becomes NaN, reported per box by geometry.clip_boxes,
    # instead of a ragged list that fails the whole image-task table.
    values = [_number(v) for v in bbox[:4]] if isinstance(bbox, (list, tuple)) else []
    return values + [math.nan] * (4 - len(values))


def _json(raw: bytes, path: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"boxes.path: {path} is not valid JSON: {exc}") from exc


def _box_table_chunks(source, path: str, boxes: BoxesSpec, rows: int = 1 << 18):
    """The box table (an open file) as Arrow tables of at most `rows` rows; of a Parquet file only the
    columns the boxes use are read."""
    try:
        if path.lower().endswith((".jsonl", ".ndjson", ".json")):
            yield pa_json.read_json(source)
            return
        parquet = pq.ParquetFile(source)
        names = parquet.schema_arrow.names
        _check_columns(names, boxes)
        used = (boxes.image_key_column, boxes.bbox_column, boxes.score_column, boxes.category_column, "annotation_id")
        for batch in parquet.iter_batches(batch_size=rows, columns=[n for n in names if n in used]):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise SpecError(f"boxes.path: {path} is not a readable Parquet or JSON-lines box table: {exc}") from exc
