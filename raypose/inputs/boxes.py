"""The boxes: load them (COCO JSON, a box table, or inline with the images) and join them to the listed images.

Everything is columnar: the boxes are one Arrow table (`schema.BOX_SCHEMA`, one row per box, in
file order), filtered with Arrow compute and grouped per image, and the join with the listing is
an Arrow join, so a plan of millions of images holds no Python object per image or box.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterator
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
from raypose.inputs.arrays import KeySequence, NotSorted, ascending, filtered
from raypose.inputs.key_order import sorted_by_key
from raypose.inputs.names import name_array
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
    """Load the job's boxes whole: a COCO annotations JSON or a Parquet/JSON-lines box table."""
    if boxes.source == "coco":
        fs, path = _box_file(boxes, storage_options)
        return coco_boxes(_json(_read(fs, path, boxes), boxes.path), boxes)
    try:
        stream = open_boxes(boxes, storage_options)
        table = stream.until(None)
    except NotSorted:  # sorted at first and not later
        stream = open_boxes(boxes, storage_options, stream=False)
        table = stream.until(None)
    return BoxSet(table, source="table", dropped=stream.dropped)


class BoxStream:
    """The job's boxes per image in key order, handed to the join a key range at a time (`until`)."""

    def __init__(self, groups: Iterator[pa.Table], source: str, dropped: Callable[[], int]):
        self._groups, self.source, self._dropped = groups, source, dropped
        self._buffer = _per_image(BOX_SCHEMA.empty_table())

    @classmethod
    def whole(cls, box_set: BoxSet) -> BoxStream:
        return cls(iter([box_set.table]), box_set.source, lambda: box_set.dropped)

    @property
    def dropped(self) -> int:
        """Boxes the filters dropped so far."""
        return self._dropped()

    def until(self, last_key: str | None) -> pa.Table:
        """The per-image boxes (`_per_image`) of keys up to `last_key` (None: all that are left), taken out."""
        while last_key is None or not self._buffer.num_rows or self._buffer.column("image_key")[-1].as_py() <= last_key:
            group = next(self._groups, None)
            if group is None:
                break
            self._buffer = pa.concat_tables([self._buffer, group]) if self._buffer.num_rows else group
        keys = _contiguous(self._buffer.column("image_key"))
        cut = len(keys) if last_key is None else bisect.bisect_right(KeySequence(keys), last_key)
        taken, self._buffer = self._buffer.slice(0, cut), self._buffer.slice(cut)
        return taken


def open_boxes(boxes: BoxesSpec, storage_options: dict[str, Any], stream: bool = True) -> BoxStream:
    """The job's boxes as a BoxStream. A box table is read as the join goes, never held whole (a JSON-lines one is
    one chunk): in its own order when its first chunk is sorted by image key (a later chunk out of order raises
    NotSorted, and the plan cuts again with `stream` False), else through sorted runs spilled to local disk
    (`key_order.py`). A COCO file is loaded whole."""
    if boxes.source != "table":
        return BoxStream.whole(load_boxes(boxes, storage_options))
    fs, path = _box_file(boxes, storage_options)
    source = _open(fs, path, boxes)
    dropped = [0]

    def kept_rows():
        for chunk in _box_table_chunks(source, boxes.path, boxes):
            kept, chunk_dropped = _filtered_rows(chunk, boxes)
            dropped[0] += chunk_dropped
            yield kept

    rows = kept_rows()
    first = next(rows, BOX_SCHEMA.empty_table())
    rows = itertools.chain([first], rows)
    if not (stream and ascending(_contiguous(first.column("image_key")))):
        rows = sorted_by_key(rows, BOX_SCHEMA)
    return BoxStream(_groups_in_key_order(rows, source, boxes.path), "table", lambda: dropped[0])


def _groups_in_key_order(rows: Iterator[pa.Table], source, path: str) -> Iterator[pa.Table]:
    """Box rows in key order as per-image groups (`_per_image`), each table's last image carried into the next
    (the next table may go on with it); rows out of order raise NotSorted. Closes `source` when done."""
    with source:
        carried = None
        for kept in rows:
            if carried is not None and carried.num_rows:
                if kept.num_rows and kept.column("image_key")[0].as_py() < carried.column("image_key")[0].as_py():
                    raise NotSorted(path)
                kept = pa.concat_tables([carried, kept]).combine_chunks()
            keys = _contiguous(kept.column("image_key"))
            if not ascending(keys):
                raise NotSorted(path)
            last = len(keys) - (pc.index(keys, keys[-1]).as_py() if len(keys) else 0)  # rows of the last key
            carried = kept.slice(len(keys) - last)
            if len(keys) > last:
                yield _per_image(kept.slice(0, len(keys) - last))
        if carried is not None and carried.num_rows:
            yield _per_image(carried)


def _box_file(boxes: BoxesSpec, storage_options: dict[str, Any]):
    try:
        fs, path = url_to_fs(boxes.path, **with_retries(boxes.path, storage_options))
        if not fs.isfile(path):
            raise SpecError(f"boxes.path: {boxes.path} does not exist")
        return fs, path
    except SpecError:
        raise
    except Exception as exc:  # any filesystem's failure (permissions, network) ends here
        raise SpecError(f"boxes.path: cannot read {boxes.path}: {type(exc).__name__}: {exc}") from exc


def _read(fs, path: str, boxes: BoxesSpec) -> bytes:
    try:
        return fs.cat_file(path)  # a COCO file is one JSON document
    except Exception as exc:
        raise SpecError(f"boxes.path: cannot read {boxes.path}: {type(exc).__name__}: {exc}") from exc


def _open(fs, path: str, boxes: BoxesSpec):
    try:
        return fs.open(path, "rb")  # a table is read from the file a chunk at a time
    except Exception as exc:
        raise SpecError(f"boxes.path: cannot read {boxes.path}: {type(exc).__name__}: {exc}") from exc


def _one_row_per_box(table: pa.Table, lists: tuple[str, ...], repeated: tuple[str, ...]) -> pa.Table:
    """A table of per-image box lists (`lists`, aligned with `bbox`) as one row per box, each row's
    `repeated` columns copied onto its boxes."""
    parents = pc.list_parent_indices(table.column("bbox"))
    return pa.table({**{name: table.column(name).take(parents) for name in repeated},
                     **{name: pc.list_flatten(table.column(name)) for name in lists}})


def coco_boxes(coco: Any, boxes: BoxesSpec) -> BoxSet:
    """Boxes from a COCO annotations dict (instances or person_keypoints): made a box table at once, then filtered
    like any other (`_filtered_rows`)."""
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise SpecError(
            f"boxes.path: {boxes.path} is not a COCO annotations file (needs 'images' and 'annotations'); "
            "for a detections list use boxes.source: table with image keys"
        )
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    wanted = _category_ids(names, boxes)  # an unknown category name is the job's error, named with the file's
    rows, orphans = coco_box_table(coco, names, boxes)
    if wanted is not None:  # an annotation whose category id the file does not name is no wanted category
        named = rows.column("category").is_valid()
        orphans += rows.num_rows - pc.sum(named.cast(pa.int64())).as_py()
        rows = filtered(rows, named)
    spec = boxes.model_copy(update={"image_key_column": "image_key", "bbox_column": "bbox", "score_column": "score",
                                    "category_column": "category",
                                    "categories": None if wanted is None else boxes.categories})
    kept, dropped = _filtered_rows(rows, spec)
    return BoxSet.of_rows(kept, source="gt", dropped=dropped + orphans)


def coco_box_table(coco: dict, names: dict[int, str], boxes: BoxesSpec) -> tuple[pa.Table, int]:
    """A COCO file's annotations as a box table (`_filtered_rows`' input: key, bbox, id, category, area, crowd, the
    image's size), in file order; and how many name no image of the file."""
    images = coco["images"]
    ids = [image.get("id") for image in images]
    for image in images:
        if not image.get("file_name"):
            raise SpecError(f"boxes.path: image id {image.get('id')} has no file_name")
    # name_array: a file_name Python wrote from os.listdir holds its non-UTF-8 bytes as surrogates (docs/names.md)
    image_keys = _normalised_keys(name_array([str(image["file_name"]) for image in images]))
    anns = [ann for ann in coco["annotations"] if isinstance(ann, dict)]
    at = pc.index_in(pa.array([ann.get("image_id") for ann in anns]), pa.array(ids))
    known = at.is_valid()
    anns = [ann for ann, ok in zip(anns, known.to_pylist()) if ok]
    at = at.filter(known)
    size = lambda name: pa.array([image.get(name) for image in images], pa.int32())  # noqa: E731
    category = pa.array([names.get(ann.get("category_id")) for ann in anns], pa.string())
    table = pa.table({
        "image_key": image_keys.take(at),
        "bbox": pa.array([_xywh(ann.get("bbox")) if ann.get("bbox") is not None else None for ann in anns],
                         pa.list_(pa.float64())),
        "annotation_id": pa.array([ann.get("id") for ann in anns], pa.int64()),
        "category": category,
        "area": pa.array([_area(ann) for ann in anns], pa.float64()),
        "iscrowd": pa.array([bool(ann.get("iscrowd", 0)) for ann in anns], pa.bool_()),
        "expected_width": size("width").take(at), "expected_height": size("height").take(at),
    })
    return table, len(known) - len(anns)


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
    if "iscrowd" in table.column_names and not boxes.include_crowd:  # COCO's crowd regions are not people to label
        keep &= ~np.asarray(pc.fill_null(table.column("iscrowd"), False))
    xywh = bbox.values.to_numpy(zero_copy_only=False).reshape(-1, 4)
    usable = np.isfinite(xywh).all(axis=1) & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    # COCO's own `area` (the segment's) where it has one, else w x h; broken boxes go on, to be reported.
    area = xywh[:, 2] * xywh[:, 3]
    if "area" in table.column_names:
        area = np.asarray(pc.fill_null(table.column("area"), np.nan).to_numpy(zero_copy_only=False), np.float64)
    with np.errstate(invalid="ignore"):
        keep &= ~(usable & (area < boxes.min_area))
    default = (boxes.categories or [None])[0]
    result = pa.table({
        "image_key": keys, "bbox": bbox,
        "annotation_id": _optional(table, "annotation_id", pa.int64(), n),
        "category": pc.fill_null(category, default) if default is not None else category,
        "score": score, "expected_width": _optional(table, "expected_width", pa.int32(), n),
        "expected_height": _optional(table, "expected_height", pa.int32(), n),
    }, schema=BOX_SCHEMA)
    result = filtered(result, pa.array(keep))
    return result, n - result.num_rows


def attach_boxes(
    images: pa.Table, box_set: BoxSet, detect_missing: bool = False
) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Join listed images with their boxes (all of them at once; the plan joins a chunk at a time, `BoxJoin`).

    Returns the image tasks (images that have boxes, and with `detect_missing` the others
    too, marked for the detector), sorted by key, an errors table for boxes whose image is not
    in storage, and counts.
    """
    join = BoxJoin(box_set.source, detect_missing, dropped=box_set.dropped)
    tasks, missing = join.chunk(images, box_set.table)
    join.check()
    return tasks, missing, join.counts


class BoxJoin:
    """Joins the listing, a chunk at a time in key order, with the boxes of the same key range; counts as it goes.

    `chunk(listed, per_image)` takes a chunk of the listing and the per-image boxes (`_per_image`) of every key
    up to the chunk's last one that no earlier chunk took: those of keys it lists become its image tasks, the
    rest are boxes whose image is not in storage (errors).
    """

    def __init__(self, source: str, detect_missing: bool = False, dropped: int = 0):
        self.source, self.detect_missing = source, detect_missing
        self.counts = dict.fromkeys(("images_listed", "images", "images_with_boxes", "images_without_boxes",
                                     "images_to_detect", "boxes", "boxes_without_image"), 0)
        self.counts["boxes_dropped_by_filters"] = dropped
        self.example: tuple[str, str] | None = None  # a listed key and a box's key, for the error that they never meet

    def chunk(self, images: pa.Table, per_image: pa.Table) -> tuple[pa.Table, pa.Table]:
        """The chunk's image tasks (sorted by key) and the errors of boxes whose image it does not list."""
        listed = images.select([c for c in LISTED_COLUMNS if c in images.column_names])
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
        if self.example is None and images.num_rows and per_image.num_rows:
            self.example = (images.column("image_key")[0].as_py(), per_image.column("image_key")[0].as_py())
        tasks = _tasks(matched, self.source, detect=False)  # in listing order: sorted by key
        if self.detect_missing:
            tasks = pa.concat_tables([tasks, _tasks(without, None, detect=True)]).sort_by("image_key")
        c = self.counts
        c["images_listed"] += images.num_rows
        c["images"] += tasks.num_rows  # sent to the pipeline
        c["images_with_boxes"] += matched.num_rows
        c["images_without_boxes"] += without.num_rows
        c["images_to_detect"] += without.num_rows if self.detect_missing else 0
        c["boxes"] += _boxes_in(matched)
        c["boxes_without_image"] += _boxes_in(missing)
        return tasks, _listing_errors(missing.column("image_key"))

    def check(self) -> None:
        """Once every chunk is in: refuse boxes that never met a listed image (their keys name another tree)."""
        c = self.counts
        if c["boxes_without_image"] and not c["images_with_boxes"] and self.example is not None:
            listed, named = self.example
            raise SpecError(
                f"boxes.path: no box belongs to a listed image: image keys look like {listed!r}, the boxes file "
                f"names {named!r}; point images.path at the folder the boxes' file names are relative to"
            )


def _boxes_in(per_image: pa.Table) -> int:
    return int(pc.sum(pc.list_value_length(per_image.column("bbox"))).as_py() or 0) if per_image.num_rows else 0


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
# What the listing says of each image, carried into its task.
LISTED_COLUMNS = ("image_key", "image_uri", "container", "offset", "length", "image_size", "image_version")


def _tasks(rows: pa.Table, source: str | None, detect: bool) -> pa.Table:
    """Image tasks (`schema.IMAGE_TASK_SCHEMA`) for joined rows; `detect`: rows without boxes, for the detector."""
    n = rows.num_rows
    columns = {name: (rows.column(name) if name in rows.column_names else pa.nulls(n, IMAGE_TASK_SCHEMA.field(name).type))
               for name in LISTED_COLUMNS}
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
        parquet = pq.ParquetFile(source, pre_buffer=False)  # a row group read whole would be held beside the join
        names = parquet.schema_arrow.names
        _check_columns(names, boxes)
        used = (boxes.image_key_column, boxes.bbox_column, boxes.score_column, boxes.category_column, "annotation_id")
        for batch in parquet.iter_batches(batch_size=rows, columns=[n for n in names if n in used]):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise SpecError(f"boxes.path: {path} is not a readable Parquet or JSON-lines box table: {exc}") from exc
