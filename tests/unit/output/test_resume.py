"""Resume: the result key (what decides the rows), refusals that name what changed, shards and job ids."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from raypose.config.spec import load_job_spec, parse_job_spec
from raypose.errors import SpecError
from raypose.output.resume import (
    JOB_ID_ENV,
    check_resumable,
    fingerprint,
    hashed_shard_of,
    keys_fingerprint,
    new_job_id,
    plan_shards,
    result_key,
    shard_of,
)
from raypose.output.writer import OutputStore

MODELS = {"expert:coco": "m@r1"}


def spec_with(**fields):
    raw = {"images": {"path": "/data"}, "boxes": {"path": "/boxes.json"}, "pose": {"model": "/model"},
           "output": {"path": "/out"}}
    for dotted, value in fields.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return parse_job_spec(raw)


def key_of(spec=None, models=MODELS, **resolved):
    return result_key(spec or spec_with(), models, resolved or None)


def test_speed_knobs_do_not_change_what_a_resume_must_match():
    base = fingerprint(key_of())
    for field, value in [("pose__compile", True), ("pose__batch_size", 512), ("resources__threads_per_pose_actor", 3),
                         ("resources__crop_in", "tasks"), ("resources__pose_calls_per_actor", 2),
                         ("output__images_per_shard", 7), ("output__compression", "snappy")]:
        assert fingerprint(key_of(spec_with(**{field: value}))) == base, field
    assert fingerprint(key_of(spec_with(images__storage_options={"key": "a", "secret": "b"}))) == base
    # JPEG draft changes the crops' pixels, the flip test the keypoints; so do the models and the decoder.
    assert fingerprint(key_of(spec_with(images__jpeg_draft=True))) != base
    assert fingerprint(key_of(spec_with(pose__flip_test=True))) != base
    assert fingerprint(key_of(models={"expert:coco": "m@r2"})) != base
    assert fingerprint(key_of(decoder="pillow")) != fingerprint(key_of(decoder="nvjpeg"))


# What an output written before the spec said which fields decide the rows recorded in its _job.json
# (the hand-kept allow-list's key, for a detector job with a custom expert): resuming it must still work.
RECORDED_KEY = {
    "images.path": "/data", "images.format": "parquet", "images.image_column": "image", "images.key_column": None,
    "images.extensions": [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"],
    "images.max_pixels": 100000000, "images.jpeg_draft": False, "boxes.source": "detector", "boxes.path": None,
    "boxes.detect_missing": False, "boxes.categories": ["person"], "boxes.min_area": 0.0,
    "boxes.include_crowd": False, "boxes.min_score": 0.0, "boxes.image_key_column": "image_key",
    "boxes.bbox_column": "bbox", "boxes.score_column": "score", "boxes.category_column": "category",
    "boxes.detector.model": "PekingU/rtdetr_r50vd_coco_o365", "boxes.detector.revision": None,
    "boxes.detector.threshold": 0.5, "boxes.detector.max_per_image": 100, "boxes.detector.min_size": 0.0,
    "boxes.detector.nms_iou": None, "pose.model": "/model", "pose.revision": None, "pose.expert": "coco",
    "pose.experts": {"ap10k": {"model": "/ap", "revision": None, "dataset_index": None, "keypoint_schema": "ap10k17",
                               "head_schema": None}},
    "pose.routing": {"dog": "ap10k"}, "pose.flip_test": False, "pose.fold_expert": False, "pose.decode": "transformers",
    "models.expert:coco": "m@r1", "layout.decoder": "pillow",
}


def test_outputs_recorded_before_the_spec_derived_the_key_still_resume():
    spec = parse_job_spec({
        "images": {"path": "/data", "format": "parquet"},
        "boxes": {"source": "detector", "detector": {"threshold": 0.5, "batch_size": 2, "dtype": "float32"}},
        "pose": {"model": "/model", "experts": {"ap10k": {"model": "/ap", "keypoint_schema": "ap10k17"}},
                 "routing": {"dog": "ap10k"}, "batch_size": 16, "compile": True},
        "resources": {"pose_actors": [1, 2]}, "output": {"path": "/out"},
    })
    key = key_of(spec, decoder="pillow")
    assert key == RECORDED_KEY
    assert fingerprint(key) == fingerprint(RECORDED_KEY)
    check_resumable({"result_key": RECORDED_KEY}, key, "/out")
    # Without a detector, its settings are no part of the key (as before).
    assert not any(name.startswith("boxes.detector.") for name in key_of())


def test_the_output_spelled_another_way_is_the_same_output(tmp_path, monkeypatch):
    job = tmp_path / "job.yaml"
    job.write_text("images: {path: data}\nboxes: {path: boxes.json}\npose: {model: model}\noutput: {path: out}\n")
    monkeypatch.chdir(tmp_path)
    keys = {fingerprint(key_of(load_job_spec(job, overrides)))
            for overrides in ([], ["output.path=out"], ["output.path=./out/"], [f"output.path={tmp_path / 'out'}"])}
    assert len(keys) == 1


def test_a_refusal_names_each_setting_that_changed():
    previous = {"result_key": key_of(decoder="pillow")}
    check_resumable(previous, key_of(), "/out")  # the spec's part, as the plan checks it
    check_resumable(previous, key_of(decoder="pillow"), "/out")
    with pytest.raises(SpecError, match=re.escape("(pose.flip_test: false -> true); use output.mode: overwrite")):
        check_resumable(previous, key_of(spec_with(pose__flip_test=True)), "/out")
    with pytest.raises(SpecError, match=re.escape('layout.decoder: "pillow" -> "nvjpeg"')):
        check_resumable(previous, key_of(decoder="nvjpeg"), "/out")
    with pytest.raises(SpecError, match=re.escape('models.expert:coco: "m@r1" -> "m@r2"')):
        check_resumable(previous, key_of(models={"expert:coco": "m@r2"}), "/out")
    with pytest.raises(SpecError, match="written by an earlier raypose that recorded no result key"):
        check_resumable({"result_fingerprint": "abc"}, key_of(), "/out")


def test_shards_are_stable_and_committed_ones_are_reused_only_for_the_same_images(tmp_path, monkeypatch):
    monkeypatch.delenv(JOB_ID_ENV, raising=False)
    spec = spec_with(output__images_per_shard=2, output__path=str(tmp_path / "out"))
    store = OutputStore(spec.output, {})
    keys = [f"img_{i}.jpg" for i in range(5)]

    def plan(keys, previous):
        return plan_shards(spec, pa.array(sorted(keys)), store, previous)

    fresh = plan(keys, previous=None)
    assert fresh.num_shards == 3 and fresh.shard_of_task.tolist() == [0, 0, 1, 1, 2]  # runs of sorted keys
    assert fresh.starts == ["img_0.jpg", "img_2.jpg", "img_4.jpg"]
    assert [shard_of(k, fresh.starts) for k in ("a.jpg", "img_1.jpg", "img_3.jpg", "z.jpg")] == [0, 0, 1, 2]
    assert sorted(k for ks in fresh.to_write.values() for k in ks.to_pylist()) == keys and not fresh.reused
    assert re.fullmatch(r"raypose-job-\d{8}T\d{6}Z-[0-9a-f]{6}", fresh.job_id)
    done = next(s for s, ks in fresh.to_write.items() if len(ks))
    store.write_json(f"_shards/{done:05d}.json", {"shard": done, "inputs": keys_fingerprint(fresh.to_write[done])})
    previous = {"job_id": fresh.job_id, "num_shards": 3, "shard_starts": fresh.starts}
    resumed = plan(keys, previous)
    assert resumed.job_id == fresh.job_id and set(resumed.reused) == {done} and done not in resumed.to_write
    changed = sorted(keys[:-1] + ["new.jpg"])
    other = plan(changed, previous)
    same_images = [k for k, s in zip(changed, other.shard_of_task) if s == done] == fresh.to_write[done].to_pylist()
    assert (done in other.reused) == same_images
    # An output from before key-range shards keeps its hashed shards when resumed.
    older = plan(keys, {"job_id": "old", "num_shards": 3})
    assert older.starts is None and older.shard_of_task.tolist() == [hashed_shard_of(k, 3) for k in keys]
    # Keys before the first shard's start (new images since) belong to the first shard.
    assert plan(["a.jpg", *keys], previous).shard_of_task.tolist() == [0, 0, 0, 1, 1, 2]


def test_a_run_on_a_cluster_takes_the_submission_id(monkeypatch, tmp_path):
    monkeypatch.setenv(JOB_ID_ENV, "nightly-20261201T000000Z-abcdef")
    spec = spec_with(output__path=str(tmp_path / "out"))
    assert plan_shards(spec, pa.array(["a"]), OutputStore(spec.output, {}), None).job_id == "nightly-20261201T000000Z-abcdef"
    assert new_job_id("x").startswith("x-")
