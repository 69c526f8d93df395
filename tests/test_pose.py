"""The pose engine against the seed's reference pipeline on the same checkpoint, images and boxes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from raypose.crops import center_scale_from_boxes, crop_image, make_crops
from raypose.keypoint_schemas import COCO17
from raypose.pose import (
    PoseEngine, PoseStage, _crop_array, cpu_pose_threads, default_batch_size, inspect_model, instance_scores,
)
from raypose.reader import read_images
from raypose.routing import resolve_routing
from raypose.spec import PoseSpec
from raypose.synthetic import draw_people, make_checkpoint
from raypose.table import IMAGE_TASK_SCHEMA, POSE_OUTPUT_SCHEMA

reference = pytest.importorskip("transformers.models.vitpose.image_processing_pil_vitpose")
pytest.importorskip("scipy")

IMAGES = [
    ((320, 240), [[20.0, 30.0, 60.0, 150.0], [200.5, 10.25, 90.0, 200.0]]),
    ((180, 400), [[5.0, 40.0, 150.0, 300.0]]),
    ((640, 160), [[300.0, 0.0, 40.0, 160.0], [0.0, 20.0, 639.0, 100.0]]),
]


def reference_pipeline(checkpoint, image: Image.Image, boxes, dataset_index=None):
    """The seed's example: processor -> VitPoseForPoseEstimation -> post_process_pose_estimation."""
    from transformers import VitPoseForPoseEstimation

    processor = reference.VitPoseImageProcessorPil.from_pretrained(checkpoint)
    model = VitPoseForPoseEstimation.from_pretrained(checkpoint).eval()
    inputs = processor(image, boxes=[boxes], return_tensors="pt")
    kwargs = {}
    if dataset_index is not None:
        kwargs["dataset_index"] = torch.full((len(boxes),), dataset_index)
    with torch.no_grad():
        outputs = model(**inputs, **kwargs)
    results = processor.post_process_pose_estimation(outputs, boxes=[np.array(boxes, np.float32)])[0]
    return np.stack([r["keypoints"].numpy() for r in results]), np.stack([r["scores"].numpy() for r in results])


def engine_for(checkpoint) -> PoseEngine:
    return PoseEngine(inspect_model(str(checkpoint)))


def ours(engine: PoseEngine, image: Image.Image, boxes, **options):
    centers, scales = center_scale_from_boxes(np.array(boxes), engine.info.input_size)
    pixels = np.asarray(image)
    crops = np.stack([crop_image(pixels, c, s, engine.info.input_size) for c, s in zip(centers, scales)])
    return engine.estimate(crops, centers, scales, **options)


def stage_for(checkpoint, **pose) -> PoseStage:
    spec = PoseSpec(model=str(checkpoint), **pose)
    return PoseStage(resolve_routing(spec), flip_test=spec.flip_test)


def crop_options(stage: PoseStage) -> dict:
    sizes = {name: expert.input_size for name, expert in stage.routing.experts.items()}
    return dict(input_sizes=sizes, routes=stage.routing.rules, default_expert=stage.routing.default,
                storage_options={}, max_pixels=10**8)


def crops_for(tasks: pa.Table, stage: PoseStage) -> pa.Table:
    return make_crops(tasks, **crop_options(stage))


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_engine_equals_reference_pipeline(tiny_checkpoint, index):
    (width, height), boxes = IMAGES[index]
    image = draw_people(width, height, np.array(boxes), seed=index)
    engine = engine_for(tiny_checkpoint)
    keypoints, scores = ours(engine, image, boxes)
    ref_keypoints, ref_scores = reference_pipeline(tiny_checkpoint, image, boxes)
    assert keypoints.shape == ref_keypoints.shape == (len(boxes), 17, 2)
    # Crops agree to one grey level on rare rounding ties, so heatmaps agree to ~1e-4 and
    # keypoints to a hundredth of a heatmap pixel (the box's size / 48 image pixels).
    np.testing.assert_allclose(scores, ref_scores, atol=1e-3)
    assert_same_keypoints(keypoints, ref_keypoints, boxes, engine)


def assert_same_keypoints(keypoints, expected, boxes, engine, heatmap_pixels=0.01):
    _, scales = center_scale_from_boxes(np.array(boxes), engine.info.input_size)
    pitch = scales * 200.0 / (np.array(engine.info.input_size) / 4 - 1)  # image px per heatmap px
    error = np.abs(keypoints - expected) / pitch[:, None, :]
    assert error.max() <= heatmap_pixels, error.max()


@pytest.mark.parametrize("expert, index", [("coco", 0), ("ap10k", 3)])
def test_moe_checkpoint_gets_the_experts_dataset_index(tmp_path, expert, index):
    checkpoint = make_checkpoint(tmp_path / "plus", preset="tiny-plus")
    (width, height), boxes = IMAGES[0]
    draw_people(width, height, np.array(boxes)).save(tmp_path / "p.png")
    # The tiny MoE's one head counts as COCO's; the AP-10K expert needs its head_schema said explicitly.
    stage = stage_for(checkpoint, expert=expert, experts={} if expert == "coco" else {expert: {"head_schema": "ap10k17"}})
    [engine] = stage.engines.values()
    seen = []
    engine.model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("dataset_index")), with_kwargs=True
    )
    tasks = pa.Table.from_pylist([task_row(tmp_path / "p.png", boxes)], schema=IMAGE_TASK_SCHEMA)
    rows = stage(crops_for(tasks, stage)).to_pylist()
    assert seen and seen[0].tolist() == [index] * len(boxes)
    assert {r["expert"] for r in rows} == {expert}
    keypoints = np.array([np.stack([r["keypoint_x"], r["keypoint_y"]], 1) for r in rows])
    ref_keypoints, _ = reference_pipeline(checkpoint, Image.open(tmp_path / "p.png"), boxes, dataset_index=index)
    assert_same_keypoints(keypoints, ref_keypoints, boxes, engine)


def test_flip_test_averages_crop_and_mirror_heatmaps(tiny_checkpoint):
    from transformers.models.vitpose.modeling_vitpose import flip_back

    from raypose.heatmaps import decode_heatmaps

    (width, height), boxes = IMAGES[0]
    image = draw_people(width, height, np.array(boxes))
    engine = engine_for(tiny_checkpoint)
    keypoints, scores = ours(engine, image, boxes, flip_pairs=COCO17.flip_pairs)

    processor = reference.VitPoseImageProcessorPil.from_pretrained(tiny_checkpoint)
    pixels = processor(image, boxes=[boxes], return_tensors="pt")["pixel_values"]
    pairs = torch.tensor(COCO17.flip_pairs)
    with torch.no_grad():
        plain = engine.model(pixel_values=pixels).heatmaps
        mirrored = engine.model(pixel_values=pixels.flip(-1)).heatmaps
    averaged = 0.5 * (plain + flip_back(mirrored, pairs))
    centers, scales = center_scale_from_boxes(np.array(boxes), engine.info.input_size)
    expected, expected_scores = decode_heatmaps(averaged, torch.from_numpy(centers), torch.from_numpy(scales))
    assert_same_keypoints(keypoints, expected.numpy(), boxes, engine)
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-3)
    plain_keypoints, _ = ours(engine_for(tiny_checkpoint), image, boxes)
    assert not np.allclose(plain_keypoints, keypoints)


def task_row(path, boxes, categories=None) -> dict:
    n = len(boxes)
    return {
        "image_key": path.name, "image_uri": str(path), "box_xywh": boxes,
        "annotation_id": list(range(1, n + 1)), "category": categories or ["person"] * n,
        "box_score": [None] * n, "box_source": "gt",
    }


def task_table(tmp_path, boxes, size=(320, 240)) -> pa.Table:
    path = tmp_path / "person.png"
    draw_people(*size, np.array([b for b in boxes if np.isfinite(b).all()]).reshape(-1, 4)).save(path)
    gone = task_row(tmp_path / "gone.png", [[0.0, 0.0, 10.0, 10.0]])
    gone["annotation_id"] = [99]
    return pa.Table.from_pylist([task_row(path, boxes), gone], schema=IMAGE_TASK_SCHEMA)


def test_pose_stage_keeps_failures_and_fills_keypoints(tiny_checkpoint, tmp_path):
    stage = stage_for(tiny_checkpoint)
    tasks = task_table(tmp_path, [[20.0, 30.0, 60.0, 150.0], [float("nan"), 0.0, 5.0, 5.0], [10.0, 10.0, 80.0, 90.0]])
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


@pytest.mark.parametrize("crop_in", ["pose_actor", "pose_device"])
def test_a_stage_that_crops_takes_image_rows_and_forwards_in_batches(tiny_checkpoint, tmp_path, crop_in):
    separate = stage_for(tiny_checkpoint)
    boxes = [[20.0, 30.0, 60.0, 150.0], [float("nan"), 0.0, 5.0, 5.0], [10.0, 10.0, 80.0, 90.0], [100.0, 5.0, 70.0, 200.0]]
    tasks = task_table(tmp_path, boxes)
    expected = separate(crops_for(tasks, separate))
    if crop_in == "pose_device":
        tasks = read_images(tasks, storage_options={})
    fused = PoseStage(separate.routing, batch_size=2, crop_in=crop_in, crop_options=crop_options(separate))
    [engine] = fused.engines.values()
    forwards = []
    engine.model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(len(kwargs["pixel_values"])),
                                           with_kwargs=True)
    got = fused(tasks)
    assert forwards == [2, 1]  # three good boxes, at most two crops per forward
    assert got.drop_columns(["keypoint_x", "keypoint_y", "keypoint_score", "instance_score"]).equals(
        expected.drop_columns(["keypoint_x", "keypoint_y", "keypoint_score", "instance_score"]))
    for name in ("keypoint_x", "keypoint_y", "keypoint_score", "instance_score"):
        ours_, theirs = got.column(name).to_pylist(), expected.column(name).to_pylist()
        assert [v is None for v in ours_] == [v is None for v in theirs]
        for a, b in zip(ours_, theirs):
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-4)


def test_calls_in_threads_crop_together_and_take_turns_at_the_forwards(tiny_checkpoint, tmp_path):
    separate = stage_for(tiny_checkpoint)
    tasks = task_table(tmp_path, [[20.0, 30.0, 60.0, 150.0], [10.0, 10.0, 80.0, 90.0]])
    stage = PoseStage(separate.routing, batch_size=1, crop_in="pose_actor", crop_options=crop_options(separate))
    expected = stage(tasks)
    [engine] = stage.engines.values()
    running, most = [0], [0]
    estimate = engine.estimate

    def counted(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.05)  # long enough for the other call to arrive
        running[0] -= 1
        return estimate(*args, **kwargs)

    engine.estimate = counted
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(stage, [tasks] * 3))
    assert most[0] == 1
    assert all(result.equals(expected) for result in results)


def test_crops_that_cannot_be_cut_on_the_device_become_error_rows(tiny_checkpoint, tmp_path, monkeypatch):
    separate = stage_for(tiny_checkpoint)
    stage = PoseStage(separate.routing, crop_in="pose_device", crop_options=crop_options(separate))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("raypose.pose.cut_crops", out_of_memory)
    tasks = read_images(task_table(tmp_path, [[20.0, 30.0, 60.0, 150.0], [float("nan"), 0.0, 5.0, 5.0]]),
                        storage_options={})
    rows = stage(tasks).to_pylist()
    assert [(r["instance_index"], r["error_stage"], r["error_reason"]) for r in rows] == [
        (0, "crop", "RuntimeError: CUDA out of memory"), (1, "boxes", rows[1]["error_reason"]),
        (None, "read", "not found in storage"),
    ]


def test_a_failing_batch_becomes_error_rows(tiny_checkpoint, tmp_path, monkeypatch):
    stage = stage_for(tiny_checkpoint)
    crops = crops_for(task_table(tmp_path, [[20.0, 30.0, 60.0, 150.0]]), stage)

    def explode(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    [engine] = stage.engines.values()
    monkeypatch.setattr(engine, "estimate", explode)
    rows = stage(crops).to_pylist()
    assert [(r["error_stage"], r["error_reason"]) for r in rows] == [
        ("pose", "RuntimeError: CUDA error: device-side assert"),
        ("read", "not found in storage"),
    ]


def test_instance_scores_rescore_confident_keypoints_by_the_box():
    scores = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.0], [0.3, 0.3, 0.9]], np.float32)
    got = instance_scores(scores, np.array([np.nan, 0.5, 0.5]))
    # Keypoints above 0.2 count; none -> 0; a box without a score (ground truth) counts as 1.
    np.testing.assert_allclose(got, [0.7, 0.0, 0.25], rtol=1e-6)
    assert got.dtype == np.float32


def test_crop_array_is_the_rows_crops_whether_viewed_or_copied():
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (6, 4, 3, 3), dtype=np.uint8)
    values = [c.tobytes() for c in crops]
    values[4] = None  # a failed row
    column = pa.array(values, pa.binary()).slice(1)  # an offset into the buffers, as a Ray Data batch has
    view = _crop_array(column, [0, 1, 2], (3, 4))
    assert not view.flags.owndata  # consecutive rows: the column's own bytes
    np.testing.assert_array_equal(view, crops[1:4])
    np.testing.assert_array_equal(_crop_array(column, [0, 2, 4], (3, 4)), crops[[1, 3, 5]])
    np.testing.assert_array_equal(_crop_array(column, [2, 4], (3, 4)), crops[[3, 5]])  # a null row between


def test_estimate_leaves_its_crops_as_they_were(tiny_checkpoint):
    engine = engine_for(tiny_checkpoint)
    crops = np.random.default_rng(1).integers(0, 256, (2, 256, 192, 3), dtype=np.uint8)
    centers, scales = center_scale_from_boxes(np.array([[10.0, 10.0, 50.0, 90.0]] * 2), engine.info.input_size)
    expected = engine.estimate(crops, centers, scales)
    for given in (crops.copy(), torch.from_numpy(crops).float()):  # normalised in place, but on a copy
        got = engine.estimate(given, centers, scales)
        np.testing.assert_array_equal(np.asarray(given), crops)
        np.testing.assert_array_equal(got[0], expected[0])


def test_inspect_model_reads_shape_without_weights(tiny_checkpoint):
    info = inspect_model(str(tiny_checkpoint))
    assert info.input_size == (192, 256)
    assert info.num_keypoints == 17 and info.num_experts == 1
    assert info.revision.startswith("sha256:")
    assert info.image_mean == pytest.approx((0.485, 0.456, 0.406))


def test_channels_last_upsample_gives_the_same_values():
    from raypose.pose import ChannelsLastUpsample

    upsample = torch.nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)
    hidden = torch.randn(3, 8, 16, 12)
    assert torch.equal(ChannelsLastUpsample(upsample)(hidden), upsample(hidden))


def test_compiled_engine_gives_the_eager_keypoints(tiny_checkpoint):
    (width, height), boxes = IMAGES[0]
    image = draw_people(width, height, np.array(boxes), seed=0)
    eager = ours(engine_for(tiny_checkpoint), image, boxes)
    compiled_engine = PoseEngine(inspect_model(str(tiny_checkpoint)), compile=True)
    compiled = ours(compiled_engine, image, boxes)
    np.testing.assert_allclose(compiled[1], eager[1], atol=1e-4)
    assert_same_keypoints(compiled[0], eager[0], boxes, compiled_engine)


def test_cpu_pose_actors_share_the_cores():
    assert cpu_pose_threads(node_cpus=16, actors=1) == 16
    assert cpu_pose_threads(node_cpus=16, actors=3) == 5
    assert cpu_pose_threads(node_cpus=16, actors=32) == 1


def test_default_batch_size_by_device():
    assert default_batch_size(on_gpu=False) == 8 and default_batch_size(on_gpu=True) == 256
