"""Routing: categories to experts, each expert checked against its checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raypose.config.spec import PoseSpec, parse_job_spec
from raypose.errors import SpecError
from raypose.imaging.keypoint_schemas import SCHEMAS
from raypose.models.routing import resolve_routing
from raypose.models.vitpose import PoseEngine, inspect_model
from raypose.testing.synthetic import draw_people, make_checkpoint


@pytest.fixture(scope="module")
def wholebody_checkpoint(tmp_path_factory):
    """A tiny dense ViTPose with a 133-channel (COCO-WholeBody) head."""
    return make_checkpoint(tmp_path_factory.mktemp("wb") / "vitpose-wholebody-tiny", num_keypoints=133)


def routing_of(**pose):
    return resolve_routing(PoseSpec(**pose))


def test_builtin_experts_on_a_moe_checkpoint_get_their_dataset_index(moe_checkpoint):
    # The tiny MoE's one head is taken as COCO's (as the published transformers ViTPose++ checkpoints);
    # the AP-10K expert is served only when told its head is AP-10K's (test_convert.py: refused otherwise).
    routing = routing_of(model=str(moe_checkpoint), routing={"dog": "ap10k", "person": "coco"},
                         experts={"ap10k": {"head_schema": "ap10k17"}})
    assert {n: (e.dataset_index, e.keypoint_schema) for n, e in routing.experts.items()} == {
        "coco": (0, "coco17"), "ap10k": (3, "ap10k17")}
    assert routing.expert_for("dog") == "ap10k" and routing.expert_for("zebra") == "coco"
    assert routing.expert_for(None) == "coco"


@pytest.mark.parametrize(
    "pose, message",
    [
        (dict(expert="wholebody"), r"pose.expert: expert 'wholebody' means 133 keypoints \(wholebody133\) but .* outputs 17"),
        (dict(expert="mine", experts={"mine": {}}), r"pose.experts.mine.keypoint_schema: required for expert 'mine'"),
        (dict(expert="mine", experts={"mine": {"keypoint_schema": "coco18"}}), r"unknown schema 'coco18'"),
        (dict(experts={"coco": {"dataset_index": 0}}), r"pose.experts.coco.dataset_index: .* is not a ViTPose\+\+ \(MoE\) checkpoint"),
    ],
)
def test_dense_checkpoint_refusals(tiny_checkpoint, pose, message):
    with pytest.raises(SpecError, match=message):
        routing_of(model=str(tiny_checkpoint), **pose)


@pytest.mark.parametrize(
    "pose, message",
    [
        (dict(expert="mine", experts={"mine": {"keypoint_schema": "coco17"}}), r"pose.experts.mine.dataset_index: required: .* \(MoE\) checkpoint with 6 experts"),
        (dict(experts={"coco": {"dataset_index": 6}}), r"pose.experts.coco.dataset_index: 6 is out of range"),
    ],
)
def test_moe_checkpoint_refusals(moe_checkpoint, pose, message):
    with pytest.raises(SpecError, match=message):
        routing_of(model=str(moe_checkpoint), **pose)


def test_expert_with_its_own_checkpoint_is_checked_against_it(tiny_checkpoint, wholebody_checkpoint):
    routing = routing_of(model=str(tiny_checkpoint), routing={"person": "wholebody"},
                         experts={"wholebody": {"model": str(wholebody_checkpoint)}})
    assert routing.experts["wholebody"].model.num_keypoints == 133
    with pytest.raises(SpecError, match=r"pose.experts.wholebody.model: .* is not a directory"):
        routing_of(model=str(tiny_checkpoint), routing={"person": "wholebody"},
                   experts={"wholebody": {"model": "/nonexistent/dir"}})


def test_unknown_experts_in_the_spec_name_the_field():
    raw = {"images": {"path": "x"}, "boxes": {"path": "b"}, "output": {"path": "o"},
           "pose": {"model": "m", "expert": "cocoo", "routing": {"dog": "ap10kk"}}}
    with pytest.raises(SpecError) as error:
        parse_job_spec(raw)
    assert "pose.expert: unknown expert 'cocoo'" in str(error.value)
    assert "pose.routing.dog: unknown expert 'ap10kk'" in str(error.value)


def test_flip_test_uses_each_schemas_pairs(wholebody_checkpoint):
    from transformers.models.vitpose.modeling_vitpose import flip_back

    from raypose.imaging.crop_cpu import crop_image
    from raypose.imaging.geometry import center_scale_from_boxes
    from raypose.imaging.heatmaps import decode_heatmaps

    engine = PoseEngine(inspect_model(str(wholebody_checkpoint)))
    boxes = np.array([[20.0, 30.0, 60.0, 150.0]])
    image = np.asarray(draw_people(320, 240, boxes))
    centers, scales = center_scale_from_boxes(boxes, engine.info.input_size)
    crops = np.stack([crop_image(image, centers[0], scales[0], engine.info.input_size)])
    pairs = SCHEMAS["wholebody133"].flip_pairs
    keypoints, _ = engine.estimate(crops, centers, scales, flip_pairs=pairs)
    pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float() * engine._scale + engine._shift
    with torch.no_grad():
        plain = engine.model(pixel_values=pixels).heatmaps
        mirrored = engine.model(pixel_values=pixels.flip(-1)).heatmaps
    averaged = 0.5 * (plain + flip_back(mirrored, torch.tensor(pairs)))
    expected, _ = decode_heatmaps(averaged, torch.from_numpy(centers), torch.from_numpy(scales))
    np.testing.assert_allclose(keypoints, expected.numpy(), atol=1e-3)


