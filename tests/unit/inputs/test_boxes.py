"""Boxes: COCO and table loaders, attaching boxes to listed images, clipping to the image."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import REPO

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.errors import SpecError
from raypose.imaging.decode import decode_image
from raypose.imaging.geometry import clip_boxes
from raypose.inputs.arrays import NotSorted
from raypose.inputs.boxes import (
    BoxJoin,
    BoxStream,
    _box_table_chunks,
    _rows_with_boxes,
    attach_boxes,
    coco_boxes,
    load_boxes,
    open_boxes,
    table_boxes,
)
from raypose.inputs.fetch import read_bytes
from raypose.inputs.listing import list_images
from raypose.schema import ERRORS_SCHEMA, IMAGE_TASK_SCHEMA

COCO_SAMPLE = REPO.parent / "shared" / "data" / "coco_sample"


def coco_dict() -> dict:
    """Two annotated images, one without boxes; a dog, a crowd, a tiny box and an orphan annotation."""
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
            {"id": 2, "file_name": "./sub/b.jpg", "width": 320, "height": 240},
            {"id": 3, "file_name": "c.jpg", "width": 100, "height": 100},
        ],
        "annotations": [
            {"id": 30, "image_id": 2, "category_id": 1, "bbox": [1, 2, 30, 40], "area": 1200, "iscrowd": 0},
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5.5, 5, 100, 200], "area": 20000, "iscrowd": 0},
            {"id": 20, "image_id": 1, "category_id": 2, "bbox": [50, 60, 70, 80], "area": 5600, "iscrowd": 0},
            {"id": 40, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 1},
            {"id": 50, "image_id": 1, "category_id": 1, "bbox": [10, 10, 4, 4], "area": 16, "iscrowd": 0},
            {"id": 60, "image_id": 99, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [7, 8, 9, 10], "area": 90},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }


def spec(**values) -> BoxesSpec:
    return BoxesSpec(**{"path": "boxes.json", **values})


def listed(*keys: str) -> pa.Table:
    return pa.table({"image_key": list(keys), "image_uri": [f"file:///data/{k}" for k in keys]})


# --- coco_boxes -----------------------------------------------------------------------------


def image_keys(boxes) -> list[str]:
    return sorted(set(boxes.table.column("image_key").to_pylist()))


def test_coco_person_boxes_in_file_order():
    boxes = coco_boxes(coco_dict(), spec())
    assert boxes.source == "gt"
    assert image_keys(boxes) == ["a.jpg", "sub/b.jpg"]  # file_name normalised; c.jpg has none
    a = boxes.image("a.jpg")
    assert a["annotation_id"] == [10, 50, 5]  # file order, not id order; dog and crowd left out
    assert a["bbox"] == [[5.5, 5, 100, 200], [10, 10, 4, 4], [7, 8, 9, 10]]
    assert all(isinstance(v, float) for box in a["bbox"] for v in box)
    assert a["category"] == ["person"] * 3
    assert a["score"] == [None] * 3
    assert (a["expected_width"], a["expected_height"]) == (640, 480)
    b = boxes.image("sub/b.jpg")
    assert (b["annotation_id"], b["bbox"], b["expected_width"], b["expected_height"]) == ([30], [[1, 2, 30, 40]], 320, 240)
    assert boxes.dropped == 3  # the dog, the crowd, the annotation of an unknown image


def test_coco_file_name_written_from_os_listdir_is_keyed_as_the_listing_keys_it(tmp_path):
    # Python's json.dump of an os.listdir name writes its non-UTF-8 byte as the surrogate "\\udce9".
    coco = coco_dict()
    coco["images"][0]["file_name"] = os.fsdecode(b"caf\xe9.jpg")
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    boxes = load_boxes(spec(path=str(tmp_path / "boxes.json")), {})
    assert image_keys(boxes) == ["caf%E9.jpg", "sub/b.jpg"]


def test_coco_include_crowd():
    boxes = coco_boxes(coco_dict(), spec(include_crowd=True))
    assert boxes.image("a.jpg")["annotation_id"] == [10, 40, 50, 5]
    assert boxes.dropped == 2


def test_coco_min_area():
    boxes = coco_boxes(coco_dict(), spec(min_area=100))
    assert boxes.image("a.jpg")["annotation_id"] == [10]  # area 16 and 90 are below
    assert boxes.image("sub/b.jpg")["annotation_id"] == [30]
    assert boxes.dropped == 5


def test_coco_category_filter_by_name():
    dogs = coco_boxes(coco_dict(), spec(categories=["dog"]))
    assert image_keys(dogs) == ["a.jpg"]
    assert dogs.image("a.jpg")["annotation_id"] == [20]
    assert dogs.image("a.jpg")["category"] == ["dog"]

    everything = coco_boxes(coco_dict(), spec(categories=None))
    assert everything.image("a.jpg")["annotation_id"] == [10, 20, 50, 5]
    assert everything.image("a.jpg")["category"] == ["person", "dog", "person", "person"]


def test_coco_unknown_category_is_spec_error():
    with pytest.raises(SpecError, match=r"^boxes\.categories: 'cat' not in boxes\.json \(it has: dog, person\)"):
        coco_boxes(coco_dict(), spec(categories=["person", "cat"]))


def test_coco_short_bbox_is_padded_with_nan():
    coco = coco_dict()
    coco["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]
    boxes = coco_boxes(coco, spec())
    [box] = boxes.image("a.jpg")["bbox"]
    assert box[:3] == [1, 2, 3] and math.isnan(box[3])
    # It reaches the crop stage as one box to report, instead of failing the whole table.
    tasks, _, _ = attach_boxes(listed("a.jpg"), boxes)
    [xywh] = tasks.column("box_xywh").to_pylist()[0]
    assert clip_boxes(np.array(xywh), 640, 480)[1][0].startswith("box has a non-finite coordinate")


@pytest.mark.parametrize("not_coco", [[{"image_id": 1, "bbox": [0, 0, 1, 1]}], {"images": []}, "text"])
def test_non_coco_json_is_spec_error(not_coco):
    with pytest.raises(SpecError, match=r"^boxes\.path: boxes\.json is not a COCO annotations file"):
        coco_boxes(not_coco, spec())


# --- load_boxes -----------------------------------------------------------------------------


def test_load_coco_local(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco_dict()))
    boxes = load_boxes(BoxesSpec(path=str(path)), {})
    assert boxes.image("a.jpg")["annotation_id"] == [10, 50, 5]
    assert boxes.image("sub/b.jpg")["annotation_id"] == [30]


@pytest.fixture
def memory_root():
    fs = fsspec.filesystem("memory")
    root = f"/raypose-boxes-{uuid.uuid4().hex}"
    yield root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_load_coco_memory(memory_root):
    fsspec.filesystem("memory").pipe(f"{memory_root}/ann.json", json.dumps(coco_dict()).encode())
    boxes = load_boxes(BoxesSpec(path=f"memory://{memory_root}/ann.json", min_area=100), {})
    assert boxes.image("a.jpg")["annotation_id"] == [10]
    assert boxes.dropped == 5


def test_load_missing_path_is_spec_error(tmp_path, memory_root):
    for path in (str(tmp_path / "nope.json"), f"memory://{memory_root}/nope.json"):
        with pytest.raises(SpecError, match=r"^boxes\.path: .*nope\.json does not exist"):
            load_boxes(BoxesSpec(path=path), {})


def test_load_invalid_json_is_spec_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(SpecError, match=r"^boxes\.path: .*bad\.json is not valid JSON"):
        load_boxes(BoxesSpec(path=str(path)), {})


# --- table boxes ----------------------------------------------------------------------------

TABLE_ROWS = [
    {"image_key": "a.jpg", "bbox": [1.0, 2.0, 30.0, 40.0], "score": 0.9, "category": "person"},
    {"image_key": "./a.jpg", "bbox": [5.0, 6.0, 7.0, 8.0], "score": 0.2, "category": "person"},
    {"image_key": "b.jpg", "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.95, "category": "dog"},
    {"image_key": "b.jpg", "bbox": [3.0, 4.0, 5.0, 6.0], "score": 0.5, "category": "person"},
    {"image_key": "c.jpg", "bbox": [3.0, 4.0, 5.0, 6.0], "score": 0.99, "category": None},
]


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("name", ["boxes.parquet", "boxes.jsonl"])
def test_load_table(tmp_path, name):
    path = write_table(tmp_path / name, TABLE_ROWS)
    boxes = load_boxes(BoxesSpec(source="table", path=str(path)), {})
    assert boxes.source == "table"
    assert image_keys(boxes) == ["a.jpg", "b.jpg", "c.jpg"]
    a = boxes.image("a.jpg")
    assert a["bbox"] == [[1, 2, 30, 40], [5, 6, 7, 8]]  # "./a.jpg" is the same image
    assert a["score"] == pytest.approx([0.9, 0.2])
    assert a["category"] == ["person", "person"]
    assert a["annotation_id"] == [None, None]
    assert (a["expected_width"], a["expected_height"]) == (None, None)
    assert boxes.image("b.jpg")["bbox"] == [[3, 4, 5, 6]]  # the dog row is filtered out
    assert boxes.image("c.jpg")["category"] == ["person"]  # no category: the wanted one
    assert boxes.dropped == 1


@pytest.mark.parametrize("name", ["boxes.parquet", "boxes.jsonl"])
def test_load_table_min_score(tmp_path, name):
    path = write_table(tmp_path / name, TABLE_ROWS)
    boxes = load_boxes(BoxesSpec(source="table", path=str(path), min_score=0.5, categories=None), {})
    assert boxes.image("a.jpg")["score"] == pytest.approx([0.9])
    assert boxes.image("b.jpg")["score"] == pytest.approx([0.95, 0.5])  # >= min_score is kept
    assert boxes.image("b.jpg")["category"] == ["dog", "person"]
    assert boxes.image("c.jpg")["category"] == [None]
    assert boxes.dropped == 1


@pytest.mark.parametrize("name", ["boxes.parquet", "boxes.jsonl"])
def test_load_table_custom_columns(tmp_path, name):
    rows = [
        {"file": "x/y.png", "box": [1, 2, 3, 4], "conf": 0.7, "label": "person", "annotation_id": 7},
        {"file": "x/y.png", "box": [5, 6, 7, 8], "conf": 0.1, "label": "person", "annotation_id": 8},
    ]
    path = write_table(tmp_path / name, rows)
    custom = BoxesSpec(
        source="table", path=str(path), image_key_column="file", bbox_column="box",
        score_column="conf", category_column="label", min_score=0.5,
    )
    boxes = load_boxes(custom, {})
    assert image_keys(boxes) == ["x/y.png"]
    entry = boxes.image("x/y.png")
    assert (entry["bbox"], entry["annotation_id"], entry["category"]) == ([[1, 2, 3, 4]], [7], ["person"])
    assert entry["score"] == pytest.approx([0.7])
    assert boxes.dropped == 1


@pytest.mark.parametrize(
    "values, field, column",
    [
        ({"bbox_column": "box"}, "boxes.bbox_column", "box"),
        ({"image_key_column": "file"}, "boxes.image_key_column", "file"),
    ],
)
def test_table_missing_column_is_spec_error(tmp_path, values, field, column):
    path = write_table(tmp_path / "boxes.parquet", TABLE_ROWS)
    with pytest.raises(SpecError, match=rf"^{field}: column '{column}' is not in .*boxes\.parquet \(columns: image_key, bbox"):
        load_boxes(BoxesSpec(source="table", path=str(path), **values), {})


def test_table_short_bbox_padded():
    table = pa.table({"image_key": ["a.jpg"], "bbox": [[1.0, 2.0]]})
    [box] = table_boxes(table, BoxesSpec(source="table", path="t.parquet")).image("a.jpg")["bbox"]
    assert box[:2] == [1, 2] and math.isnan(box[2]) and math.isnan(box[3])


@pytest.mark.parametrize("order", ["sorted", "shuffled", "one late key"])
@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7, 1000])
def test_table_in_chunks_groups_as_one_read(order, rows_per_chunk, tmp_path, monkeypatch):
    # Chunk by chunk (an image's boxes across chunk ends, a chunk of one image, unsorted keys) the
    # boxes are what grouping the whole table at once gives, file order kept within each image.
    rng = np.random.default_rng(rows_per_chunk)
    keys = sorted(f"img/{k:03d}.jpg" for k in rng.integers(0, 12, 40))
    if order == "shuffled":
        rng.shuffle(keys)
    elif order == "one late key":
        keys.append(keys[0])
    n = len(keys)
    table = pa.table({"image_key": keys, "bbox": [[float(i), 1.0, 5.0 + i % 3, 6.0] for i in range(n)],
                      "score": rng.uniform(0, 1, n).astype(np.float32),
                      "category": ["person" if i % 5 else "dog" for i in range(n)]})
    from functools import partial

    from raypose.inputs import boxes as boxes_module
    from raypose.inputs.key_order import sorted_by_key

    monkeypatch.setattr(boxes_module, "_box_table_chunks", lambda source, path, spec, rows=rows_per_chunk:
                        _box_table_chunks(source, path, spec, rows))
    monkeypatch.setattr(boxes_module, "sorted_by_key", partial(sorted_by_key, run_rows=5, batch_rows=3))
    pq.write_table(table, tmp_path / "boxes.parquet")
    boxes_spec = BoxesSpec(source="table", path=str(tmp_path / "boxes.parquet"), min_score=0.2)
    loaded = load_boxes(boxes_spec, {})  # streamed, or merged from sorted runs (also after a late key)
    grouped, dropped = loaded.table, loaded.dropped
    whole = table_boxes(table, boxes_spec)
    assert grouped.to_pylist() == whole.table.to_pylist() and dropped == whole.dropped
    assert grouped.column("image_key").to_pylist() == sorted(set(grouped.column("image_key").to_pylist()))


@pytest.mark.parametrize("listing_sorted", [True, False])
def test_join_chunk_by_chunk_finds_what_one_hash_finds(listing_sorted):
    rng = np.random.default_rng(7)
    with_boxes = sorted({f"k{v:04d}" for v in rng.integers(0, 500, 200)})
    listed = sorted({f"k{v:04d}" for v in rng.integers(0, 600, 300)})
    if not listing_sorted:
        rng.shuffle(listed)
    cuts = sorted(rng.choice(len(with_boxes), 6, replace=False))
    grouped = pa.chunked_array([with_boxes[a:b] for a, b in zip([0, *cuts], [*cuts, len(with_boxes)])], pa.string())
    where = _rows_with_boxes(pa.array(listed), grouped)
    assert where.to_pylist() == pc.index_in(pa.array(listed), pa.array(with_boxes)).to_pylist()


def test_table_not_readable_is_spec_error(tmp_path):
    path = tmp_path / "boxes.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(SpecError, match=r"^boxes\.path: .*boxes\.parquet is not a readable Parquet"):
        load_boxes(BoxesSpec(source="table", path=str(path)), {})


# --- attach_boxes ---------------------------------------------------------------------------


def test_attach_boxes():
    coco = coco_dict()
    coco["images"].append({"id": 4, "file_name": "ghost.jpg", "width": 10, "height": 10})
    coco["annotations"] += [
        {"id": 70, "image_id": 4, "category_id": 1, "bbox": [0, 0, 5, 5]},
        {"id": 71, "image_id": 4, "category_id": 1, "bbox": [1, 1, 5, 5]},
    ]
    boxes = coco_boxes(coco, spec())
    images = listed("a.jpg", "c.jpg", "d.jpg", "sub/b.jpg")
    tasks, errors, counts = attach_boxes(images, boxes)

    assert tasks.schema == IMAGE_TASK_SCHEMA
    got = tasks.to_pylist()
    assert [t["image_key"] for t in got] == ["a.jpg", "sub/b.jpg"]  # in listing order
    a = got[0]
    assert a["image_uri"] == "file:///data/a.jpg"
    assert (a["expected_width"], a["expected_height"]) == (640, 480)
    assert a["box_xywh"] == [[5.5, 5, 100, 200], [10, 10, 4, 4], [7, 8, 9, 10]]
    assert a["annotation_id"] == [10, 50, 5]
    assert a["category"] == ["person"] * 3
    assert a["box_score"] == [None] * 3
    assert a["box_source"] == "gt"

    assert errors.schema == ERRORS_SCHEMA
    assert errors.to_pylist() == [
        {
            "job_id": None,
            "image_key": "ghost.jpg",
            "image_uri": None,
            "instance_index": None,
            "stage": "list",
            "reason": "listed in the boxes file but not found under images.path",
        }
    ]
    assert counts == {
        "images_listed": 4,
        "images": 2,
        "images_to_detect": 0,
        "images_with_boxes": 2,
        "images_without_boxes": 2,  # c.jpg (no annotations) and d.jpg (not in the file)
        "boxes": 4,
        "boxes_dropped_by_filters": 3,
        "boxes_without_image": 2,
    }


def test_attach_no_key_matches_is_spec_error():
    boxes = coco_boxes(coco_dict(), spec())
    images = listed("images/a.jpg", "images/sub/b.jpg")
    with pytest.raises(SpecError, match=r"^boxes\.path: no box belongs to a listed image") as info:
        attach_boxes(images, boxes)
    message = str(info.value)
    assert "'images/a.jpg'" in message and "'a.jpg'" in message  # a listed key and a key of the boxes file
    assert "point images.path at the folder" in message


# --- clip_boxes -----------------------------------------------------------------------------


def test_clip_boxes():
    boxes = np.array(
        [
            [10, 20, 30, 40],  # inside
            [math.nan, 0, 10, 10],
            [0, 0, math.inf, 10],
            [0, -math.inf, 10, 10],
            [5, 5, 0, 10],  # zero width
            [5, 5, 10, -1],  # negative height
            [200, 10, 20, 20],  # right of the image
            [10, -50, 20, 20],  # above the image
            [-10, 90, 30, 40],  # partly outside: left and bottom
            [0, 0, 100, 120],  # exactly the image
        ],
        dtype=np.float64,
    )
    clipped, reasons = clip_boxes(boxes, 100, 120)
    assert clipped.shape == (10, 4)
    assert reasons[0] is None and clipped[0].tolist() == [10, 20, 30, 40]
    for index in (1, 2, 3):
        assert reasons[index].startswith("box has a non-finite coordinate")
    assert reasons[4] == "box has zero or negative size: w=0, h=10"
    assert reasons[5] == "box has zero or negative size: w=10, h=-1"
    assert reasons[6] == "box [200.0, 10.0, 20.0, 20.0] lies outside the 100x120 image"
    assert reasons[7] == "box [10.0, -50.0, 20.0, 20.0] lies outside the 100x120 image"
    assert reasons[8] is None and clipped[8].tolist() == [0, 90, 20, 30]
    assert reasons[9] is None and clipped[9].tolist() == [0, 0, 100, 120]


def test_clip_boxes_accepts_one_flat_box():
    clipped, reasons = clip_boxes([-5, -5, 10, 10], 8, 8)
    assert clipped.tolist() == [[0, 0, 5, 5]] and reasons == [None]


# --- the real COCO sample beside the repository ---------------------------------------------


def test_real_coco_sample():
    if not COCO_SAMPLE.is_dir():
        pytest.skip(f"{COCO_SAMPLE} is not there (shared/ sits beside the repository)")
    annotations = json.loads((COCO_SAMPLE / "test_coco.json").read_text())
    person_ids = {c["id"] for c in annotations["categories"] if c["name"] == "person"}
    persons = [
        a for a in annotations["annotations"] if a["category_id"] in person_ids and not a.get("iscrowd", 0)
    ]
    per_file = {
        image["file_name"]: [a["id"] for a in persons if a["image_id"] == image["id"]]
        for image in annotations["images"]
    }

    boxes = load_boxes(BoxesSpec(path=str(COCO_SAMPLE / "test_coco.json"), categories=["person"]), {})
    images = list_images(ImagesSpec(path=str(COCO_SAMPLE))).images
    tasks, errors, counts = attach_boxes(images, boxes)

    assert images.column("image_key").to_pylist() == sorted(per_file)
    assert len(per_file) == 4 and len(persons) == 14  # as the folder's README says
    assert errors.num_rows == 0
    assert counts["images_listed"] == counts["images_with_boxes"] == len(per_file)
    assert counts["images_without_boxes"] == 0
    assert counts["boxes"] == len(persons)
    assert counts["boxes_dropped_by_filters"] == len(annotations["annotations"]) - len(persons)
    assert counts["boxes_without_image"] == 0
    for task in tasks.to_pylist():
        assert task["annotation_id"] == per_file[task["image_key"]]
        assert all(reason is None for reason in clip_boxes(
            np.array(task["box_xywh"]), task["expected_width"], task["expected_height"]
        )[1])

    sizes = {image["file_name"]: (image["width"], image["height"]) for image in annotations["images"]}
    for task in tasks.to_pylist():
        image = decode_image(read_bytes(task["image_uri"], {}), max_pixels=100_000_000)
        assert image.mode == "RGB"
        assert image.size == sizes[task["image_key"]] == (task["expected_width"], task["expected_height"])


def test_broken_boxes_are_reported_not_filtered_by_min_area():
    """boxes.min_area drops small boxes; a NaN, negative or zero-size one must still become an error row."""
    from raypose.config.spec import BoxesSpec
    from raypose.inputs.boxes import coco_boxes

    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50]},   # kept
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]},     # too small: dropped
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, -50, 50]},  # negative: reported
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, -50, -50]},  # negative (area > 0): reported
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 50]},    # zero: reported
            {"id": 6, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 0, 50, 50]},  # NaN: reported
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 10.0},  # small segment: dropped
        ],
    }
    box_set = coco_boxes(coco, BoxesSpec(source="coco", path="x.json", min_area=100))
    assert box_set.image("a.jpg")["annotation_id"] == [1, 3, 4, 5, 6] and box_set.dropped == 2


# --- the join a chunk at a time --------------------------------------------------------------


@pytest.mark.parametrize("rows_sorted", [True, False])
def test_a_box_table_streams_in_key_order_when_sorted(tmp_path, monkeypatch, rows_sorted):
    from raypose.inputs import boxes as boxes_module

    monkeypatch.setattr(boxes_module, "_box_table_chunks", lambda source, path, spec, rows=3:
                        _box_table_chunks(source, path, spec, rows))  # three rows a chunk: images span chunks
    rows = [{"image_key": f"{k}.jpg", "bbox": [float(i), 0.0, 5.0, 5.0], "score": 0.9, "category": "person"}
            for i, k in enumerate("aabbbcdeeg")]
    path = write_table(tmp_path / "boxes.parquet", rows if rows_sorted else rows[::-1])
    stream = open_boxes(BoxesSpec(source="table", path=str(path)), {})
    whole = load_boxes(BoxesSpec(source="table", path=str(path)), {}).table
    assert stream.until("b.jpg").column("image_key").to_pylist() == ["a.jpg", "b.jpg"]
    assert stream.until("d.jpg").column("image_key").to_pylist() == ["c.jpg", "d.jpg"]
    rest = stream.until(None)
    assert rest.column("image_key").to_pylist() == ["e.jpg", "g.jpg"]
    assert rest.column("bbox").to_pylist() == whole.slice(4).column("bbox").to_pylist()


def three_row_chunks(monkeypatch):
    from raypose.inputs import boxes as boxes_module

    monkeypatch.setattr(boxes_module, "_box_table_chunks", lambda source, path, spec, rows=3:
                        _box_table_chunks(source, path, spec, rows))


def test_an_unsorted_table_is_merged_from_sorted_runs_in_the_table_order_of_each_key(tmp_path, monkeypatch):
    from functools import partial

    from raypose.inputs import boxes as boxes_module
    from raypose.inputs.key_order import sorted_by_key

    three_row_chunks(monkeypatch)
    monkeypatch.setattr(boxes_module, "sorted_by_key", partial(sorted_by_key, run_rows=4, batch_rows=2))
    keys = "gbeacbdaebeg"
    rows = [{"image_key": f"{k}.jpg", "bbox": [float(i), 0.0, 5.0, 5.0], "score": 0.9, "category": "person"}
            for i, k in enumerate(keys)]
    path = write_table(tmp_path / "boxes.parquet", rows)
    stream = open_boxes(BoxesSpec(source="table", path=str(path)), {})
    whole = load_boxes(BoxesSpec(source="table", path=str(path)), {}).table
    got = pa.concat_tables([stream.until("c.jpg"), stream.until(None)])
    assert got.to_pylist() == whole.to_pylist()
    assert got.column("bbox").to_pylist()[1] == [[1.0, 0.0, 5.0, 5.0], [5.0, 0.0, 5.0, 5.0], [9.0, 0.0, 5.0, 5.0]]


def test_a_first_chunk_the_filters_empty_still_streams(tmp_path, monkeypatch):
    three_row_chunks(monkeypatch)
    rows = [{"image_key": f"{k}.jpg", "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.9, "category": c}
            for k, c in zip("aabbcd", ["dog"] * 3 + ["person"] * 3)]
    path = write_table(tmp_path / "boxes.parquet", rows)
    stream = open_boxes(BoxesSpec(source="table", path=str(path), categories=["person"]), {})
    assert stream.until(None).column("image_key").to_pylist() == ["b.jpg", "c.jpg", "d.jpg"]
    assert stream.dropped == 3


def test_a_table_sorted_at_first_and_not_later_stops_the_stream_and_sorts_when_asked(tmp_path, monkeypatch):
    three_row_chunks(monkeypatch)
    rows = [{"image_key": f"{k}.jpg", "bbox": [float(i), 1.0, 5.0, 5.0], "score": 0.9, "category": "person"}
            for i, k in enumerate("abcdefa")]
    path = write_table(tmp_path / "boxes.parquet", rows)
    spec = BoxesSpec(source="table", path=str(path))
    with pytest.raises(NotSorted):
        open_boxes(spec, {}).until(None)
    assert open_boxes(spec, {}, stream=False).until(None).to_pylist() == load_boxes(spec, {}).table.to_pylist()


def test_the_join_a_chunk_at_a_time_matches_the_join_at_once():
    coco = coco_dict()
    box_set = coco_boxes(coco, spec())
    images = listed("a.jpg", "b.jpg", "c.jpg", "sub/b.jpg", "z.jpg")
    at_once, missing_at_once, counts = attach_boxes(images, box_set)
    stream = BoxStream.whole(box_set)
    join = BoxJoin("gt")
    tasks, missing = [], []
    for start in (0, 2, 4):
        chunk = images.slice(start, 2)
        last = None if start == 4 else chunk.column("image_key")[-1].as_py()
        chunk_tasks, chunk_missing = join.chunk(chunk, stream.until(last))
        tasks.append(chunk_tasks)
        missing.append(chunk_missing)
    assert pa.concat_tables(tasks).to_pylist() == at_once.to_pylist()
    assert pa.concat_tables(missing).to_pylist() == missing_at_once.to_pylist()
    assert join.counts == {**counts, "boxes_dropped_by_filters": 0}
