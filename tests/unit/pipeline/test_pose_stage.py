"""The pose stage without Ray: crop rows (or image rows its cropper cuts) in, keypoint rows out, failures kept."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
from helpers import crop_options, image_task, task_table

from raypose.config.spec import PoseSpec
from raypose.models.routing import resolve_routing
from raypose.pipeline.crop_stage import make_crops, plan_crops
from raypose.pipeline.croppers import CpuCropper, DeviceCropper
from raypose.pipeline.pose_stage import PoseSettings, PoseStage
from raypose.schema import POSE_OUTPUT_SCHEMA
from raypose.testing.synthetic import draw_people

KEYPOINT_COLUMNS = ["keypoint_x", "keypoint_y", "keypoint_score", "instance_score"]


def stage_for(checkpoint, cropper=None, batch_size: int = 8, flip_uncertainty: bool = False, **pose) -> PoseStage:
    spec = PoseSpec(model=str(checkpoint), **pose)
    settings = PoseSettings(batch_size=batch_size, flip_test=spec.flip_test, flip_uncertainty=flip_uncertainty)
    return PoseStage(resolve_routing(spec), settings, cropper)


def crops_for(tasks: pa.Table, stage: PoseStage) -> pa.Table:
    return make_crops(tasks, options=crop_options(routing=stage.routing))


def person_tasks(tmp_path, boxes, size=(320, 240)) -> pa.Table:
    """A drawn picture with `boxes`, and an image that is not in storage."""
    path = tmp_path / "person.png"
    draw_people(*size, np.array([b for b in boxes if np.isfinite(b).all()]).reshape(-1, 4)).save(path)
    return task_table(image_task(path, boxes), image_task(tmp_path / "gone.png", [[0.0, 0.0, 10.0, 10.0]], first_annotation=99))


def test_pose_stage_keeps_failures_and_fills_keypoints(tiny_checkpoint, tmp_path):
    stage = stage_for(tiny_checkpoint)
    tasks = person_tasks(tmp_path, [[20.0, 30.0, 60.0, 150.0], [float("nan"), 0.0, 5.0, 5.0], [10.0, 10.0, 80.0, 90.0]])
    crops = crops_for(tasks, stage)
    out = stage(crops)
    assert out.schema == POSE_OUTPUT_SCHEMA
    rows = out.to_pylist()
    assert [(r["image_key"], r["instance_index"], r["error_stage"]) for r in rows] == [
        ("person.png", 0, None), ("person.png", 1, "boxes"), ("person.png", 2, None), ("gone.png", None, "read"),
    ]
    for row in (rows[0], rows[2]):
        assert len(row["keypoint_x"]) == len(row["keypoint_score"]) == 17
        assert row["expert"] == "coco" and row["keypoint_schema"] == "coco17"
        assert 0 <= row["instance_score"] <= 1
    assert rows[1]["keypoint_x"] is None and rows[1]["instance_score"] is None
    # The same crop alone gives the same keypoints: rows are not mixed up within a batch.
    alone = stage(crops.slice(2, 1)).to_pylist()[0]
    np.testing.assert_allclose(alone["keypoint_x"], rows[2]["keypoint_x"], atol=1e-3)


FLIP_COLUMNS = ["keypoint_flip_error", "flip_oks", "instance_doubt"]


@pytest.mark.parametrize("flip_test", [False, True])
def test_the_flip_columns_are_filled_when_asked_for_and_leave_the_keypoints_as_they_were(tiny_checkpoint, tmp_path,
                                                                                         flip_test):
    tasks = person_tasks(tmp_path, [[20.0, 30.0, 60.0, 150.0], [float("nan"), 0.0, 5.0, 5.0], [10.0, 10.0, 80.0, 90.0]])
    without = stage_for(tiny_checkpoint, flip_test=flip_test)
    crops = crops_for(tasks, without)
    plain = without(crops)
    assert all(plain.column(name).null_count == plain.num_rows for name in FLIP_COLUMNS)
    with_flip = stage_for(tiny_checkpoint, flip_test=flip_test, flip_uncertainty=True)
    forwards = []
    [engine] = with_flip.engines.values()
    engine.model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(len(kwargs["pixel_values"])),
                                           with_kwargs=True)
    out = with_flip(crops)
    assert forwards == [4]  # two good crops and their mirror images, in one forward
    assert out.drop_columns(FLIP_COLUMNS).equals(plain.drop_columns(FLIP_COLUMNS))
    rows = out.to_pylist()
    assert [r["flip_oks"] is None for r in rows] == [False, True, False, True]  # a bad box and a missing image
    for row in (rows[0], rows[2]):
        assert len(row["keypoint_flip_error"]) == 17 and min(row["keypoint_flip_error"]) >= 0
        assert 0 < row["flip_oks"] <= 1
        # 1 - mean(score x agreement), agreements in [0, 1] averaging to flip_oks (a ground-truth box scores 1)
        scores = np.clip(row["keypoint_score"], 0, 1)
        assert 1 - scores.mean() - 1e-6 <= row["instance_doubt"] <= 1
        assert row["instance_doubt"] >= 1 - scores.max() * row["flip_oks"] - 1e-6


@pytest.mark.parametrize("cropper", ["cpu", "device"])
def test_a_stage_that_crops_takes_image_rows_and_forwards_in_batches(tiny_checkpoint, tmp_path, cropper):
    separate = stage_for(tiny_checkpoint)
    boxes = [[20.0, 30.0, 60.0, 150.0], [float("nan"), 0.0, 5.0, 5.0], [10.0, 10.0, 80.0, 90.0], [100.0, 5.0, 70.0, 200.0]]
    tasks = person_tasks(tmp_path, boxes)
    expected = separate(crops_for(tasks, separate))
    options = crop_options(routing=separate.routing)
    if cropper == "device":
        tasks = plan_crops(tasks, options=options)
    fused = stage_for(tiny_checkpoint, CpuCropper(options) if cropper == "cpu" else DeviceCropper(options), batch_size=2)
    [engine] = fused.engines.values()
    forwards = []
    engine.model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(len(kwargs["pixel_values"])),
                                           with_kwargs=True)
    got = fused(tasks)
    assert forwards == [2, 1]  # three good boxes, at most two crops per forward
    assert got.drop_columns(KEYPOINT_COLUMNS).equals(expected.drop_columns(KEYPOINT_COLUMNS))
    for name in KEYPOINT_COLUMNS:
        ours, theirs = got.column(name).to_pylist(), expected.column(name).to_pylist()
        assert [v is None for v in ours] == [v is None for v in theirs]
        for a, b in zip(ours, theirs):
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-4)


def test_calls_in_threads_crop_together_and_take_turns_at_the_forwards(tiny_checkpoint, tmp_path):
    separate = stage_for(tiny_checkpoint)
    tasks = person_tasks(tmp_path, [[20.0, 30.0, 60.0, 150.0], [10.0, 10.0, 80.0, 90.0]])
    cpu = CpuCropper(crop_options(routing=separate.routing))
    stage = stage_for(tiny_checkpoint, cpu, batch_size=1)
    expected = stage(tasks)
    # All three calls must be cropping at once before any goes on to its forwards...
    together = threading.Barrier(3, timeout=60)

    class CropTogether:
        parts = cpu.parts

        def __call__(self, batch, device):
            rows = cpu(batch, device)
            together.wait()
            return rows

    stage.cropper = CropTogether()
    [engine] = stage.engines.values()
    running, most, submit = [0], [0], engine.submit

    def counted(*args, **kwargs):
        # ...and each forward runs holding the actor's forward lock, one at a time.
        assert stage._forwards.locked()
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            return submit(*args, **kwargs)
        finally:
            running[0] -= 1

    engine.submit = counted
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(stage, [tasks] * 3))
    assert most[0] == 1
    assert all(result.equals(expected) for result in results)


def test_the_next_forward_is_sent_before_the_last_one_is_waited_for(tiny_checkpoint, tmp_path):
    boxes = [[20.0, 30.0, 60.0, 150.0], [10.0, 10.0, 80.0, 90.0], [100.0, 20.0, 90.0, 200.0]]
    whole = stage_for(tiny_checkpoint)
    crops = crops_for(person_tasks(tmp_path, boxes), whole)
    stage = stage_for(tiny_checkpoint, batch_size=1)
    [engine] = stage.engines.values()
    events, submit, collect = [], engine.submit, engine.collect

    def submitted(*args, **kwargs):
        events.append("submit")
        return submit(*args, **kwargs)

    def collected(pending):
        assert not stage._forwards.locked()  # waiting for a forward leaves the device to the other calls
        events.append("collect")
        return collect(pending)

    engine.submit, engine.collect = submitted, collected
    out = stage(crops)
    assert events == ["submit", "submit", "collect", "submit", "collect", "collect"]
    expected = whole(crops)
    for column in KEYPOINT_COLUMNS:  # the same keypoints as one forward of all three
        np.testing.assert_allclose(np.asarray(out.column(column).to_pylist()[:3], np.float64),
                                   np.asarray(expected.column(column).to_pylist()[:3], np.float64), atol=1e-4)


@pytest.mark.parametrize("step", ["submit", "collect"])
def test_a_failing_batch_becomes_error_rows(tiny_checkpoint, tmp_path, monkeypatch, step):
    stage = stage_for(tiny_checkpoint)
    crops = crops_for(person_tasks(tmp_path, [[20.0, 30.0, 60.0, 150.0]]), stage)

    def explode(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    [engine] = stage.engines.values()
    monkeypatch.setattr(engine, step, explode)
    rows = stage(crops).to_pylist()
    assert [(r["error_stage"], r["error_reason"]) for r in rows] == [
        ("pose", "RuntimeError: CUDA error: device-side assert"),
        ("read", "not found in storage"),
    ]
