"""The ViTPose engine against the seed's reference pipeline on the same checkpoint, images and boxes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import crop_options, image_task, task_table
from PIL import Image

from raypose.config.spec import PoseSpec
from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.geometry import center_scale_from_boxes
from raypose.imaging.keypoint_schemas import COCO17
from raypose.imaging.uncertainty import flip_oks, keypoint_flip_errors
from raypose.models.routing import resolve_routing
from raypose.models.vitpose import PoseEngine, inspect_model
from raypose.pipeline.crop_stage import make_crops
from raypose.pipeline.pose_stage import PoseStage
from raypose.testing.synthetic import draw_people

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
    return PoseStage(resolve_routing(PoseSpec(model=str(checkpoint), **pose)))


def crops_for(tasks: pa.Table, stage: PoseStage) -> pa.Table:
    return make_crops(tasks, options=crop_options(routing=stage.routing))


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
def test_moe_checkpoint_gets_the_experts_dataset_index(moe_checkpoint, tmp_path, expert, index):
    checkpoint = moe_checkpoint
    (width, height), boxes = IMAGES[0]
    draw_people(width, height, np.array(boxes)).save(tmp_path / "p.png")
    # The tiny MoE's one head counts as COCO's; the AP-10K expert needs its head_schema said explicitly.
    stage = stage_for(checkpoint, expert=expert, experts={} if expert == "coco" else {expert: {"head_schema": "ap10k17"}})
    [engine] = stage.engines.values()
    seen = []
    engine.model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("dataset_index")), with_kwargs=True
    )
    tasks = task_table(image_task(tmp_path / "p.png", boxes))
    rows = stage(crops_for(tasks, stage)).to_pylist()
    assert seen and seen[0].tolist() == [index] * len(boxes)
    assert {r["expert"] for r in rows} == {expert}
    keypoints = np.array([np.stack([r["keypoint_x"], r["keypoint_y"]], 1) for r in rows])
    ref_keypoints, _ = reference_pipeline(checkpoint, Image.open(tmp_path / "p.png"), boxes, dataset_index=index)
    assert_same_keypoints(keypoints, ref_keypoints, boxes, engine)


def test_flip_test_averages_crop_and_mirror_heatmaps(tiny_checkpoint):
    from transformers.models.vitpose.modeling_vitpose import flip_back

    from raypose.imaging.heatmaps import decode_heatmaps

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


class ConstructedHeatmaps(torch.nn.Module):
    """A stand-in for the ViTPose network whose heatmaps are known: `fixed` puts keypoint k's peak at
    `peaks[k]` whatever the crop shows (confidently wrong); `bright` puts every keypoint's peak where
    the crop is brightest (4x4 blocks averaged, so a mirrored crop gives exactly mirrored heatmaps)."""

    def __init__(self, kind: str, peaks: np.ndarray | None = None, shape=(17, 64, 48)):
        super().__init__()
        self.kind, self.shape = kind, shape
        if peaks is not None:
            ys, xs = torch.meshgrid(torch.arange(shape[1]), torch.arange(shape[2]), indexing="ij")
            peaks = torch.as_tensor(peaks, dtype=torch.float32)
            distance = (xs - peaks[:, 0, None, None]) ** 2 + (ys - peaks[:, 1, None, None]) ** 2
            self.fixed = torch.exp(-distance / (2 * 2.0**2))

    def forward(self, pixel_values, **_):
        import types

        if self.kind == "fixed":
            heatmaps = self.fixed.expand(pixel_values.shape[0], *self.shape)
        else:
            brightness = torch.nn.functional.avg_pool2d(pixel_values.mean(1, keepdim=True), 4)
            heatmaps = (brightness / brightness.amax((-2, -1), keepdim=True)).expand(-1, self.shape[0], -1, -1)
        return types.SimpleNamespace(heatmaps=heatmaps.contiguous())


def blob_crop(x: float, y: float, size=(192, 256)) -> np.ndarray:
    """A dark crop with one bright Gaussian blob at crop pixel (x, y)."""
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    value = 20 + 230 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 12.0**2))
    return np.repeat(value[..., None], 3, axis=2).round().astype(np.uint8)


def test_flip_views_of_a_model_that_ignores_the_crop_disagree_by_what_its_peaks_say(tiny_checkpoint):
    """Peaks fixed in the crop: the mirrored view's keypoint k is its partner's peak mirrored, known exactly."""
    engine = engine_for(tiny_checkpoint)
    peaks = np.stack([np.linspace(8, 30, 17).round(), np.linspace(10, 50, 17).round()], axis=1)
    engine.model = ConstructedHeatmaps("fixed", peaks)
    centers, scales = center_scale_from_boxes(np.array([[30.0, 20.0, 90.0, 120.0]]), engine.info.input_size)
    crops = np.zeros((1, 256, 192, 3), np.uint8)
    submitted = engine.submit(crops, centers, scales, flip_pairs=COCO17.flip_pairs, flip_views=True)
    views = engine.collect_views(submitted)
    partner = np.arange(17)
    for a, b in COCO17.flip_pairs:
        partner[a], partner[b] = b, a
    mirrored_peaks = np.stack([47 - peaks[partner, 0], peaks[partner, 1]], axis=1)
    errors = keypoint_flip_errors(views[0], views[1], scales, engine.info.input_size)[0]
    expected = np.hypot((mirrored_peaks[:, 0] - peaks[:, 0]) * 191 / 47, (mirrored_peaks[:, 1] - peaks[:, 1]) * 255 / 63)
    np.testing.assert_allclose(errors, expected, atol=1e-3)
    assert errors.max() > 40
    # Each view alone is sure of itself (peaks of 1.0); averaged, two peaks far apart halve the score.
    _, plain_scores = engine.collect(engine.submit(crops, centers, scales, flip_pairs=COCO17.flip_pairs,
                                                   average_flip=False))
    assert plain_scores.min() > 0.99
    _, scores = engine.collect(submitted)
    np.testing.assert_allclose(scores[0, errors > 20], 0.5, atol=0.01)


def test_flip_views_agree_for_a_model_that_follows_the_crop_on_a_symmetric_crop_and_its_flipped_copy(tiny_checkpoint):
    engine = engine_for(tiny_checkpoint)
    engine.model = ConstructedHeatmaps("bright")
    centers, scales = center_scale_from_boxes(np.array([[30.0, 20.0, 90.0, 120.0]] * 3), engine.info.input_size)
    symmetric, off_centre = blob_crop(95.5, 100.0), blob_crop(40.0, 180.0)
    crops = np.stack([symmetric, off_centre, off_centre[:, ::-1]])
    np.testing.assert_array_equal(symmetric, symmetric[:, ::-1])
    views = engine.collect_views(engine.submit(crops, centers, scales, flip_pairs=COCO17.flip_pairs, flip_views=True))
    errors = keypoint_flip_errors(views[0], views[1], scales, engine.info.input_size)
    assert errors.max() < 1e-3
    oks = flip_oks(views[0], views[1], np.full(3, 90.0 * 120.0), COCO17.sigmas)
    np.testing.assert_allclose(oks, 1.0, atol=1e-6)
    # The flipped copy's keypoints are the crop's, mirrored about the crop's centre, to within DARK's
    # mixed-derivative stencil (the reference's: it reads the (+1, +1) and (-1, -1) diagonals only, so
    # it is not exactly mirror-symmetric).
    np.testing.assert_allclose(views[0, 2, :, 0], 2 * centers[2, 0] - views[0, 1, :, 0], atol=0.1)


def test_flip_views_change_neither_the_averaged_nor_the_plain_keypoints(tiny_checkpoint):
    (width, height), boxes = IMAGES[0]
    image = draw_people(width, height, np.array(boxes))
    engine = engine_for(tiny_checkpoint)
    averaged = ours(engine, image, boxes, flip_pairs=COCO17.flip_pairs)
    plain = ours(engine, image, boxes)
    centers, scales = center_scale_from_boxes(np.array(boxes), engine.info.input_size)
    crops = np.stack([crop_image(np.asarray(image), c, s, engine.info.input_size) for c, s in zip(centers, scales)])
    for average, expected in ((True, averaged), (False, plain)):
        submitted = engine.submit(crops, centers, scales, flip_pairs=COCO17.flip_pairs, average_flip=average,
                                  flip_views=True)
        keypoints, scores = engine.collect(submitted)
        np.testing.assert_array_equal(keypoints, expected[0])
        np.testing.assert_array_equal(scores, expected[1])
    np.testing.assert_allclose(engine.collect_views(submitted)[0], plain[0], atol=1e-4)
    assert engine.collect_views(engine.submit(crops, centers, scales)) is None
    with pytest.raises(ValueError, match="flip_pairs"):
        engine.submit(crops, centers, scales, flip_views=True)


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
    from raypose.models.vitpose import ChannelsLastUpsample

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




@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_queued_on_the_gpu_come_back_as_each_alone(tiny_checkpoint):
    engine = PoseEngine(inspect_model(str(tiny_checkpoint)), device="cuda")
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 256, (n, 256, 192, 3), dtype=np.uint8) for n in (3, 5)]
    centers, scales = center_scale_from_boxes(np.array([[10.0, 10.0, 50.0, 90.0]] * 5), engine.info.input_size)
    alone = [engine.estimate(crops, centers[: len(crops)], scales[: len(crops)]) for crops in batches]
    queued = [engine.submit(crops, centers[: len(crops)], scales[: len(crops)]) for crops in batches]
    for expected, submitted in zip(reversed(alone), reversed(queued)):  # the later one first: each waits for its own
        keypoints, scores = engine.collect(submitted)
        np.testing.assert_allclose(keypoints, expected[0], atol=1e-4)
        np.testing.assert_allclose(scores, expected[1], atol=1e-5)
