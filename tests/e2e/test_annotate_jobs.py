"""raypose.annotate on a user's own Dataset (HF-style Parquet rows here; read_images in docs/python.md, run by test_docs)
gives the rows `raypose submit` gives on the same images, boxes and
checkpoint; failures come out as rows; read_keypoints reads a job's output back."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import read_json

import raypose
from raypose.schema import ANNOTATED_SCHEMA, KEYPOINTS_SCHEMA

POSE = {"batch_size": 4, "dtype": "float32"}  # as job_dict's job: float32, four crops a forward


@pytest.fixture(scope="module")
def submitted(coco_job_output):
    """`raypose submit` over the drawn COCO images: the output annotate must reproduce."""
    return coco_job_output


def collected(dataset) -> pa.Table:
    batches = list(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(batches) if batches else ANNOTATED_SCHEMA.empty_table()
    return table.sort_by([("image_key", "ascending"), ("instance_index", "ascending")])


def assert_same_rows(ours: pa.Table, theirs: pa.Table, differ: dict[str, object]) -> None:
    """Every column both tables have is equal, but those in `differ` (name -> what ours hold instead)."""
    theirs = theirs.sort_by([("image_key", "ascending"), ("instance_index", "ascending")])
    assert ours.num_rows == theirs.num_rows > 0
    shared = [name for name in ours.column_names if name in theirs.column_names]
    assert set(KEYPOINTS_SCHEMA.names) - set(shared) == {"job_id", "track_id"}  # tracks are linked as a job commits
    for name in shared:
        if name in differ:
            assert set(ours.column(name).to_pylist()) == {differ[name]}, name
        else:
            assert ours.column(name).to_pylist() == theirs.column(name).to_pylist(), name


def boxes_by_file(coco_folder) -> dict[str, tuple[list, list]]:
    coco = read_json(coco_folder / "boxes.json")
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    boxes: dict[str, tuple[list, list]] = {name: ([], []) for name in names.values()}
    for ann in coco["annotations"]:
        boxes[names[ann["image_id"]]][0].append(ann["bbox"])
        boxes[names[ann["image_id"]]][1].append(ann["id"])
    return boxes


def test_hf_style_parquet_rows_give_the_rows_submit_gives_and_failures_as_rows(
        submitted, parquet_images, tiny_checkpoint, coco_folder, tmp_path):
    import ray.data

    for part in parquet_images.iterdir():
        shutil.copy(part, tmp_path / part.name)
    good = (coco_folder / "images" / "img_0000.jpg").read_bytes()
    pq.write_table(pa.table({  # a truncated JPEG, and a box of zero width
        "image": [{"bytes": good[:200], "path": "cut.jpg"}, {"bytes": good, "path": "flat.jpg"}],
        "bbox": [[[1.0, 1.0, 20.0, 20.0]], [[5.0, 5.0, 0.0, 10.0]]],
    }), tmp_path / "part-9.parquet")
    labelled = raypose.annotate(ray.data.read_parquet(str(tmp_path)), {"model": str(tiny_checkpoint), **POSE})
    ours = collected(labelled)
    failed = ours.filter(ours.column("error_stage").is_valid())
    assert {(r["image_key"], r["error_stage"]) for r in failed.to_pylist()} == {("cut.jpg", "decode"),
                                                                                ("flat.jpg", "boxes")}
    assert all(r["keypoint_x"] is None and r["error_reason"] for r in failed.to_pylist())
    # The rows name no file or annotation ids, and their boxes came with them: the rest is submit's.
    assert_same_rows(ours.filter(ours.column("error_stage").is_null()), pq.read_table(submitted / "keypoints"),
                     differ={"box_source": "inline", "image_uri": None, "annotation_id": None})


def test_read_keypoints_gives_the_table_with_its_keypoint_names(submitted):
    table = raypose.read_keypoints(str(submitted))
    assert table.num_rows == pq.read_table(submitted / "keypoints").num_rows
    described = json.loads(table.schema.metadata[b"raypose"])
    assert described["keypoint_schemas"]["coco17"]["keypoints"][0] == "nose"
    assert raypose.read_keypoints(str(submitted), columns=["image_key"]).column_names == ["image_key"]
    assert raypose.read_keypoints(str(submitted), dataset=True).count() == table.num_rows
    with pytest.raises(raypose.OutputError, match="not a raypose output"):
        raypose.read_keypoints(str(submitted / "keypoints"))
