"""Resume: the result key (what decides the rows), refusals that name what changed, shards and job ids."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest

from raypose.config.spec import load_job_spec, parse_job_spec
from raypose.errors import SpecError
from raypose.output.resume import (
    JOB_ID_ENV,
    OutputState,
    ShardCutter,
    check_resumable,
    fingerprint,
    input_fingerprints,
    job_id_for,
    new_job_id,
    result_key,
    supersede,
)
from raypose.output.writer import OutputStore
from raypose.schema import IMAGE_TASK_SCHEMA

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
    "images.format": "parquet", "images.image_column": "image", "images.key_column": None,
    "images.extensions": [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"],
    "images.max_pixels": 100000000, "images.jpeg_draft": False, "boxes.source": "detector",
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
    # A key recorded when the paths were part of it: only the names the key has now are compared.
    check_resumable({"result_key": {**RECORDED_KEY, "images.path": "/elsewhere", "boxes.path": None}}, key, "/out")
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


def tasks_of(keys, sizes=None, boxes=None):
    """Image tasks for `keys` (sorted), as the listing and the box join make them."""
    n = len(keys)
    return pa.Table.from_pylist([
        {"image_key": k, "image_uri": f"file:///data/{k}", "image_size": (sizes or {}).get(k, 100),
         "image_version": "mtime:1", "box_xywh": (boxes or {}).get(k, [[1.0, 2.0, 3.0, 4.0]]),
         "annotation_id": [ord(k[0])], "category": ["person"], "box_score": [None], "box_source": "gt"}
        for k in sorted(keys)], schema=IMAGE_TASK_SCHEMA) if n else IMAGE_TASK_SCHEMA.empty_table()


def cut(store, state, tasks, per_shard=2, write=True, chunk=3):
    cutter = ShardCutter(store, state, "job-1", per_shard, write=write)
    for start in range(0, tasks.num_rows, chunk):
        cutter.add(tasks.slice(start, chunk))
    return cutter.finish()


def commit(store, plan):
    """Commit markers for a plan's shards, as the writer leaves them (no rows: the index is the plan file)."""
    for shard, inputs in plan.to_write.items():
        store.write_json(f"_shards/{shard:05d}.json", {
            "shard": shard, "job_id": plan.job_id, "inputs": inputs.fingerprint, "first_key": inputs.first_key,
            "last_key": inputs.last_key, "plan": inputs.plan, "images": inputs.images, "instances": 0,
            "errors": 0, "errors_by_stage": {}, "files": []})


def test_shards_are_runs_of_sorted_keys_written_as_plan_files(tmp_path):
    spec = spec_with(output__path=str(tmp_path / "out"))
    store = OutputStore(spec.output, {})
    plan = cut(store, OutputState(None, {}, []), tasks_of([f"img_{i}.jpg" for i in range(5)]))
    assert sorted(plan.to_write) == [0, 1, 2] and plan.images == 5 and not plan.reused and not plan.superseded
    assert [(i.first_key, i.last_key, i.images) for i in plan.to_write.values()] == [
        ("img_0.jpg", "img_1.jpg", 2), ("img_2.jpg", "img_3.jpg", 2), ("img_4.jpg", "img_4.jpg", 1)]
    shard_1 = pa.parquet.read_table(tmp_path / "out" / "_plan" / "00001.parquet")
    assert shard_1.column("image_key").to_pylist() == ["img_2.jpg", "img_3.jpg"]
    assert shard_1.column("shard").to_pylist() == [1, 1] and shard_1.column("input_fingerprint").null_count == 0
    elsewhere = OutputStore(spec_with(output__path=str(tmp_path / "checked")).output, {})
    checked = cut(elsewhere, OutputState(None, {}, []), tasks_of(["a.jpg"]), write=False)  # validate: counts only
    assert checked.images == 1 and not (tmp_path / "checked").exists()


def test_a_run_over_committed_shards_labels_only_what_is_new_or_changed(tmp_path):
    spec = spec_with(output__path=str(tmp_path / "out"))
    store = OutputStore(spec.output, {})
    first = cut(store, OutputState(None, {}, []), tasks_of(["b.jpg", "d.jpg", "f.jpg", "h.jpg"]))
    commit(store, first)
    state = OutputState.read(store)
    assert sorted(state.committed) == [0, 1] and state.next_shard == 2
    # New keys between and after the old ones, one image replaced (another size), one with other boxes.
    later = tasks_of(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "f.jpg", "h.jpg", "z.jpg"], sizes={"d.jpg": 999},
                     boxes={"h.jpg": [[9.0, 9.0, 9.0, 9.0]]})
    second = cut(store, state, later, per_shard=3)
    assert second.kept == 2 and second.images == 5 and sorted(second.to_write) == [2, 3]
    assert second.superseded == {0: ["d.jpg"], 1: ["h.jpg"]}
    labelled = pa.concat_tables([pa.parquet.read_table(tmp_path / "out" / "_plan" / f"{s:05d}.parquet") for s in (2, 3)])
    assert labelled.column("image_key").to_pylist() == ["a.jpg", "c.jpg", "d.jpg", "h.jpg", "z.jpg"]
    # The changed images' rows leave their old shards; then nothing is new: nothing to label.
    for shard, keys in second.superseded.items():
        marker = supersede(store, second.reused[shard], keys)
        assert marker["images"] == 1 and marker["superseded"] == 1
    commit(store, second)
    third = cut(store, OutputState.read(store), later)
    assert third.images == 0 and third.kept == 7 and not third.superseded


def test_shards_with_missing_files_or_no_marker_are_leftovers(tmp_path):
    spec = spec_with(output__path=str(tmp_path / "out"))
    store = OutputStore(spec.output, {})
    plan = cut(store, OutputState(None, {}, []), tasks_of(["a.jpg", "b.jpg", "c.jpg"]))
    commit(store, plan)
    (tmp_path / "out" / "keypoints").mkdir()
    (tmp_path / "out" / "keypoints" / "shard-00001-abc.parquet").write_bytes(b"part of an unfinished shard")
    (tmp_path / "out" / "_plan" / "00000.parquet").unlink()  # shard 0's index is gone: not committed whole
    state = OutputState.read(store)
    assert sorted(state.committed) == [1] and state.next_shard == 2
    state.clean(store)
    assert not (tmp_path / "out" / "keypoints" / "shard-00001-abc.parquet").exists()
    assert not (tmp_path / "out" / "_shards" / "00000.json").exists()


def test_fingerprints_change_with_the_file_and_the_boxes_not_the_order_of_chunks():
    base = input_fingerprints(tasks_of(["a.jpg", "b.jpg"]))
    assert input_fingerprints(tasks_of(["a.jpg", "b.jpg"]).slice(1)) == base.slice(1)
    assert input_fingerprints(tasks_of(["a.jpg", "b.jpg"], sizes={"a.jpg": 5}))[0] != base[0]
    assert input_fingerprints(tasks_of(["a.jpg", "b.jpg"], boxes={"b.jpg": [[1.0, 2.0, 3.0, 5.0]]}))[1] != base[1]


def test_resume_keeps_the_job_id_and_append_takes_a_new_one(monkeypatch):
    monkeypatch.delenv(JOB_ID_ENV, raising=False)
    previous = {"job_id": "nightly-1"}
    assert job_id_for(spec_with(output__mode="resume"), previous) == "nightly-1"
    assert job_id_for(spec_with(output__mode="append"), previous).startswith("raypose-job-")
    assert re.fullmatch(r"raypose-job-\d{8}T\d{6}Z-[0-9a-f]{6}", job_id_for(spec_with(), None))


def test_a_run_on_a_cluster_takes_the_submission_id(monkeypatch):
    monkeypatch.setenv(JOB_ID_ENV, "nightly-20261201T000000Z-abcdef")
    assert job_id_for(spec_with(), None) == "nightly-20261201T000000Z-abcdef"
    assert new_job_id("x").startswith("x-")
