"""Reading an output back: the manifest, the keypoint schemas and the Parquet tables, from any fsspec URL."""

from __future__ import annotations

import json

import pytest
from helpers import pose_rows

from raypose.config.spec import OutputSpec
from raypose.imaging.keypoint_schemas import COCO17
from raypose.output.writer import OutputStore, PartTarget, ShardInputs, ShardWriter
from raypose.review.reading import JobOutput, OutputError, parse_storage_options


@pytest.fixture
def output(tmp_path):
    """An unfinished output: one committed shard, no manifest yet."""
    store = OutputStore(OutputSpec(path=str(tmp_path / "out")), {})
    target = PartTarget(output=store.output, storage_options={}, job_id="job-1", models={"coco": ("m", "r")},
                        schemas={"coco17": COCO17.describe()})
    writer = ShardWriter(store, target, shards={0: ShardInputs(2, "fp")})
    writer.write(pose_rows({"image_key": "a", "instance_index": 0},
                           {"image_key": "b", "instance_index": None, "error_stage": "read", "error_reason": "gone"}))
    return tmp_path / "out"


def test_an_unfinished_output_reads_its_schemas_from_the_parquet_metadata(output):
    job = JobOutput.open(str(output))
    assert not job.complete and job.experts == {}
    assert job.schema("coco17")["keypoints"] == list(COCO17.keypoints)
    assert job.read(["image_key"]).column("image_key").to_pylist() == ["a"]
    assert job.read(["stage"], table="errors").column("stage").to_pylist() == ["read"]
    assert [b.num_rows for b in job.batches(["image_key", "keypoint_x"])] == [1]
    with pytest.raises(OutputError, match="keypoint schema 'mpii16' is used in the table but described neither"):
        job.schema("mpii16")


def test_a_finished_output_reads_its_manifest(output):
    manifest = {"job_id": "job-1", "experts": {"coco": {"model": "m", "revision": "r", "keypoint_schema": "coco17"}}}
    (output / "manifest.json").write_text(json.dumps(manifest))
    job = JobOutput.open(str(output))
    assert job.complete and job.experts["coco"]["revision"] == "r"


def test_what_is_not_an_output_is_refused_with_one_line(tmp_path):
    with pytest.raises(OutputError, match=r"is not a raypose output \(no manifest.json and no keypoints/\)"):
        JobOutput.open(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(OutputError, match="manifest.json is not valid JSON"):
        JobOutput.open(str(tmp_path))


def test_storage_options_are_read_as_yaml_values():
    assert parse_storage_options(["anon=true", "endpoint_url=http://h:9000", "n=3"]) == {
        "anon": True, "endpoint_url": "http://h:9000", "n": 3}
    with pytest.raises(OutputError, match="expected key=value"):
        parse_storage_options(["anon"])
