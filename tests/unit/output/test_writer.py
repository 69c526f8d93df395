"""The writer: pose rows into per-shard Parquet, a shard committed (files, then marker) once all its images are in."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import pose_rows

from raypose.config.spec import OutputSpec
from raypose.errors import SpecError
from raypose.imaging.keypoint_schemas import COCO17
from raypose.output.resume import OutputState
from raypose.output.writer import (
    OutputStore,
    PartTarget,
    ShardInputs,
    ShardWriter,
    write_parts,
)
from raypose.schema import ERRORS_SCHEMA, KEYPOINTS_SCHEMA


@pytest.fixture
def store(tmp_path):
    return OutputStore(OutputSpec(path=str(tmp_path / "out")), {})


def target_for(store) -> PartTarget:
    return PartTarget(output=store.output, storage_options={}, job_id="job-1", models={"coco": ("m", "r1")},
                      schemas={"coco17": COCO17.describe()})


def writer_for(store, shards: dict[int, int]) -> ShardWriter:
    return ShardWriter(store, target_for(store),
                       shards={shard: ShardInputs(images, f"fp{shard}") for shard, images in shards.items()})


def one_file(folder):
    [path] = folder.glob("shard-00000*.parquet")
    return path


def test_a_shard_commits_when_its_last_image_is_in_and_not_before(store, tmp_path):
    writer = writer_for(store, {0: 2, 1: 1})
    writer.write(pose_rows({"image_key": "a", "instance_index": 0, "image_rows": 2},
                           {"image_key": "c", "instance_index": 0, "shard": 1}))
    assert set(writer.committed) == {1}  # shard 0 still waits for a's second row and for b
    writer.write(pose_rows({"image_key": "a", "instance_index": 1, "error_stage": "boxes", "error_reason": "nan",
                            "image_rows": 2},
                           {"image_key": "b", "instance_index": None, "error_stage": "read", "error_reason": "gone"}))
    assert set(writer.committed) == {0, 1}
    marker = json.loads((tmp_path / "out" / "_shards" / "00000.json").read_text())
    assert (marker["images"], marker["instances"], marker["errors"], marker["inputs"]) == (2, 1, 2, "fp0")
    assert marker["errors_by_stage"] == {"boxes": 1, "read": 1}
    keypoints = pq.read_table(one_file(tmp_path / "out" / "keypoints"))
    assert keypoints.schema.remove_metadata() == KEYPOINTS_SCHEMA
    assert keypoints.column("job_id").to_pylist() == ["job-1"] and keypoints.column("model_revision").to_pylist() == ["r1"]
    assert json.loads(keypoints.schema.metadata[b"raypose"])["keypoint_schemas"]["coco17"]["keypoints"][0] == "nose"
    errors = pq.read_table(one_file(tmp_path / "out" / "errors"))
    assert errors.schema.remove_metadata() == ERRORS_SCHEMA
    assert sorted(errors.column("stage").to_pylist()) == ["boxes", "read"]
    writer.close()
    assert json.loads((tmp_path / "out" / "keypoint_schemas.json").read_text())["coco17"]["skeleton"]


def test_an_empty_shard_commits_at_once_with_an_empty_keypoints_file(store, tmp_path):
    writer = writer_for(store, {0: 0})
    assert set(writer.committed) == {0}
    assert pq.read_table(tmp_path / "out" / "keypoints" / "shard-00000.parquet").num_rows == 0
    assert not list((tmp_path / "out" / "errors").glob("shard-00000*"))  # no errors, no errors file


def test_closing_with_a_shard_not_complete_fails(store):
    writer = writer_for(store, {0: 2})
    writer.write(pose_rows({"image_key": "a", "instance_index": 0}))
    with pytest.raises(RuntimeError, match=r"shards not complete: \[0\]"):
        writer.close()


def test_images_with_nothing_to_label_are_counted(store, tmp_path):
    writer = writer_for(store, {0: 1})
    writer.write(pose_rows({"image_key": "a", "instance_index": None}))
    marker = json.loads((tmp_path / "out" / "_shards" / "00000.json").read_text())
    assert (marker["images"], marker["instances"], marker["errors"], marker["images_without_boxes"]) == (1, 0, 0, 1)


def test_the_store_probes_writability_without_leaving_anything(store, tmp_path):
    store.check_writable()
    assert not (tmp_path / "out").exists()
    assert store.existing_entries() == []
    store.write_json("_job.json", {"job_id": "j"})
    assert "_job.json" in store.existing_entries() and store.read_json("_job.json") == {"job_id": "j"}
    (tmp_path / "out" / "mine.txt").write_text("not raypose's")
    store.clear()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.txt"]  # other files are left alone


def test_an_unwritable_output_is_a_spec_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpecError, match="output.path: cannot write to"):
        OutputStore(OutputSpec(path=str(tmp_path / "file" / "out")), {}).check_writable()


def test_parts_are_written_where_the_rows_are_and_named_by_their_rows(store, tmp_path):
    rows = pose_rows({"image_key": "a", "instance_index": 0, "image_rows": 2},
                     {"image_key": "a", "instance_index": 1, "image_rows": 2, "shard": 0},
                     {"image_key": "c", "instance_index": 0, "shard": 1})
    target = target_for(store)
    summaries = write_parts(rows, target=target).to_pylist()
    again = write_parts(rows, target=target).to_pylist()  # a retried task
    assert summaries == again  # the same parts, the same names: nothing is written twice
    assert [(s["shard"], s["images"], s["rows"], s["instances"]) for s in summaries] == [(0, ["a"], [2], 2), (1, ["c"], [1], 1)]
    parts = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out" / "_tmp" / "parts").rglob("*.parquet"))
    assert [str(p) for p in parts] == sorted(f"_tmp/parts/{f}" for s in summaries for f in s["files"])
    assert not (tmp_path / "out" / "keypoints").exists()  # nothing is visible until its shard commits
    writer = writer_for(store, {0: 1, 1: 1})
    writer.take(pa.Table.from_pylist(summaries[:1], schema=write_parts(rows, target=target).schema))
    assert set(writer.committed) == {0} and len(list((tmp_path / "out" / "keypoints").glob("shard-00000-*"))) == 1
    assert writer.committed[0]["instances"] == 2 and json.loads((tmp_path / "out" / "_shards" / "00000.json").read_text())


def test_a_later_run_removes_what_an_unfinished_shard_left(store, tmp_path):
    writer = writer_for(store, {0: 2})
    writer.write(pose_rows({"image_key": "a", "instance_index": 0}))  # a part, not committed
    state = OutputState.read(store)
    assert not state.committed and state.leftovers
    state.clean(store)
    assert not list((tmp_path / "out").rglob("shard-00000*"))
