"""The boxes: load them (COCO JSON or a box table), attach them to images, clip them to the image."""

from __future__ import annotations

import json
import math
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from raypose.config.spec import BoxesSpec
from raypose.errors import SpecError
from raypose.inputs.storage import with_retries
from raypose.schema import ERRORS_SCHEMA, IMAGE_TASK_SCHEMA


@dataclass
class ImageBoxes:
    """The boxes of one image, in file order, COCO xywh in image pixels."""

    xywh: list[list[float]] = field(default_factory=list)
    annotation_id: list[int | None] = field(default_factory=list)
    category: list[str | None] = field(default_factory=list)
    score: list[float | None] = field(default_factory=list)
    width: int | None = None  # the size the boxes file says the image has
    height: int | None = None


@dataclass
class BoxSet:
    """Boxes keyed by image key, and how many the filters dropped."""

    by_image: dict[str, ImageBoxes]
    source: str  # gt | table
    dropped: int = 0


def load_boxes(boxes: BoxesSpec, storage_options: dict[str, Any]) -> BoxSet:
    """Load the job's boxes from a COCO annotations JSON or a Parquet/JSONL box table."""
    try:
        fs, path = url_to_fs(boxes.path, **with_retries(boxes.path, storage_options))
        if not fs.isfile(path):
            raise SpecError(f"boxes.path: {boxes.path} does not exist")
        raw = fs.cat_file(path)
    except SpecError:
        raise
    except Exception as exc:  # any filesystem's failure (permissions, network) ends here
        raise SpecError(f"boxes.path: cannot read {boxes.path}: {type(exc).__name__}: {exc}") from exc
    if boxes.source == "coco":
        return coco_boxes(_json(raw, boxes.path), boxes)
    return table_boxes(_box_table(raw, boxes.path), boxes)


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
    by_image: dict[str, ImageBoxes] = {}
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
        entry = by_image.setdefault(key, ImageBoxes(width=width, height=height))
        entry.xywh.append(_xywh(bbox))
        entry.annotation_id.append(ann.get("id"))
        entry.category.append(names.get(ann.get("category_id")))
        entry.score.append(None)
    return BoxSet(by_image=by_image, source="gt", dropped=dropped)


def table_boxes(table: pa.Table, boxes: BoxesSpec) -> BoxSet:
    """Boxes from a table with one row per box: image key, COCO xywh [, score, category, annotation_id]."""
    for column in (boxes.image_key_column, boxes.bbox_column):
        if column not in table.column_names:
            field = "boxes.image_key_column" if column == boxes.image_key_column else "boxes.bbox_column"
            raise SpecError(
                f"{field}: column {column!r} is not in {boxes.path} (columns: {', '.join(table.column_names)})"
            )
    keys = table.column(boxes.image_key_column).to_pylist()
    bboxes = table.column(boxes.bbox_column).to_pylist()
    n = table.num_rows
    scores = _optional_column(table, boxes.score_column, n)
    categories = _optional_column(table, boxes.category_column, n)
    ann_ids = _optional_column(table, "annotation_id", n)
    wanted = set(boxes.categories) if boxes.categories is not None else None
    by_image: dict[str, ImageBoxes] = {}
    dropped = 0
    for key, bbox, score, category, ann_id in zip(keys, bboxes, scores, categories, ann_ids):
        keep = (
            key is not None
            and bbox is not None
            and (wanted is None or category is None or category in wanted)
            and (score is None or score >= boxes.min_score)
            and not (_usable(bbox) and _box_area(bbox) < boxes.min_area)  # broken boxes go on, to be reported
        )
        if not keep:
            dropped += 1
            continue
        entry = by_image.setdefault(posixpath.normpath(str(key)), ImageBoxes())
        entry.xywh.append(_xywh(bbox))
        entry.annotation_id.append(ann_id)
        entry.category.append(category if category is not None else (boxes.categories or [None])[0])
        entry.score.append(score)
    return BoxSet(by_image=by_image, source="table", dropped=dropped)


def attach_boxes(
    images: pa.Table, box_set: BoxSet, detect_missing: bool = False
) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Join listed images with their boxes.

    Returns the image tasks (images that have boxes, and with `detect_missing` the others
    too, marked for the detector), an errors table for boxes whose image is not in
    storage, and counts.
    """
    keys = images.column("image_key").to_pylist()
    uris = images.column("image_uri").to_pylist()
    where = {name: images.column(name).to_pylist() if name in images.column_names else [None] * len(keys)
             for name in ("container", "offset", "length")}
    place = {k: {name: values[i] for name, values in where.items()} for i, k in enumerate(keys)}
    listed = set(keys)
    matched = [(k, u) for k, u in zip(keys, uris) if k in box_set.by_image]
    if box_set.by_image and not matched:
        example_key, example_box = keys[0], next(iter(box_set.by_image))
        raise SpecError(
            f"boxes.path: no box belongs to a listed image: image keys look like {example_key!r}, "
            f"the boxes file names {example_box!r}; point images.path at the folder the boxes' "
            "file names are relative to"
        )
    tasks = [(k, u, box_set.by_image[k], False) for k, u in matched]
    if detect_missing:
        tasks += [(k, u, ImageBoxes(), True) for k, u in zip(keys, uris) if k not in box_set.by_image]
        tasks.sort(key=lambda task: task[0])
    rows: dict[str, list] = {name: [] for name in IMAGE_TASK_SCHEMA.names}
    for key, uri, entry, detect in tasks:
        values = {
            "image_key": key, "image_uri": uri, "expected_width": entry.width, "expected_height": entry.height,
            "box_xywh": entry.xywh, "annotation_id": entry.annotation_id, "category": entry.category,
            "box_score": entry.score, "box_source": None if detect else box_set.source,
            "needs_detection": detect,
            **place[key],
        }
        for name in rows:
            rows[name].append(values.get(name))
    missing = sorted(k for k in box_set.by_image if k not in listed)
    errors = _listing_errors(missing)
    counts = {
        "images_listed": len(keys),
        "images": len(tasks),  # sent to the pipeline
        "images_with_boxes": len(matched),
        "images_without_boxes": len(keys) - len(matched),
        "images_to_detect": sum(task[3] for task in tasks),
        "boxes": sum(len(box_set.by_image[k].xywh) for k, _ in matched),
        "boxes_dropped_by_filters": box_set.dropped,
        "boxes_without_image": sum(len(box_set.by_image[k].xywh) for k in missing),
    }
    return pa.table(rows, schema=IMAGE_TASK_SCHEMA), errors, counts


def _listing_errors(missing: list[str]) -> pa.Table:
    """Errors-table rows for images the boxes file names but the listing does not have."""
    n = len(missing)
    return pa.table({
        "job_id": pa.nulls(n, pa.string()), "image_key": missing, "image_uri": pa.nulls(n, pa.string()),
        "instance_index": pa.nulls(n, pa.int32()), "stage": ["list"] * n,
        "reason": ["listed in the boxes file but not found under images.path"] * n,
    }, schema=ERRORS_SCHEMA)


def inline_boxes(images: pa.Table, boxes: BoxesSpec) -> BoxSet:
    """Boxes that came with the images (WebDataset .json members, Parquet columns), filtered like a table's."""
    rows = []
    for key, bboxes, categories, scores in zip(
        images.column("image_key").to_pylist(), images.column("bbox").to_pylist(),
        images.column("category").to_pylist(), images.column("score").to_pylist(),
    ):
        rows += [{"image_key": key, "bbox": b, "category": c, "score": s} for b, c, s in zip(bboxes, categories, scores)]
    table = pa.Table.from_pylist(rows, schema=pa.schema(
        [("image_key", pa.string()), ("bbox", pa.list_(pa.float64())), ("category", pa.string()), ("score", pa.float64())]
    ))
    spec = boxes.model_copy(update={"image_key_column": "image_key", "bbox_column": "bbox",
                                    "category_column": "category", "score_column": "score"})
    box_set = table_boxes(table, spec)
    return BoxSet(by_image=box_set.by_image, source="inline", dropped=box_set.dropped)


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


def _optional_column(table: pa.Table, name: str, n: int) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * n


def _json(raw: bytes, path: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"boxes.path: {path} is not valid JSON: {exc}") from exc


def _box_table(raw: bytes, path: str) -> pa.Table:
    try:
        if path.lower().endswith((".jsonl", ".ndjson", ".json")):
            return pa_json.read_json(pa.BufferReader(raw))
        return pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowInvalid, OSError) as exc:
        raise SpecError(f"boxes.path: {path} is not a readable Parquet or JSON-lines box table: {exc}") from exc
