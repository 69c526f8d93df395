"""Routing: categories to experts, each expert checked against its checkpoint, mixed jobs end to end."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import job_dict, read_json
from raypose.cli import app
from raypose.errors import SpecError
from raypose.keypoint_schemas import SCHEMAS
from raypose.pose import PoseEngine, inspect_model
from raypose.routing import resolve_routing
from raypose.spec import PoseSpec, parse_job_spec
from raypose.synthetic import draw_people, make_checkpoint


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A tiny ViTPose++: 6 experts, one 17-channel head."""
    return make_checkpoint(tmp_path_factory.mktemp("plus") / "vitpose-plus-tiny", preset="tiny-plus")


@pytest.fixture(scope="module")
def wholebody_checkpoint(tmp_path_factory):
    """A tiny dense ViTPose with a 133-channel (COCO-WholeBody) head."""
    return make_checkpoint(tmp_path_factory.mktemp("wb") / "vitpose-wholebody-tiny", num_keypoints=133)


def routing_of(**pose):
    return resolve_routing(PoseSpec(**pose))


def test_builtin_experts_on_a_moe_checkpoint_get_their_dataset_index(moe_checkpoint):
    # The tiny MoE's one head is taken as COCO's (as the published transformers ViTPose++ checkpoints);
    # the AP-10K expert is served only when told its head is AP-10K's (tests/test_convert.py: refused otherwise).
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

    from raypose.crops import center_scale_from_boxes, crop_image
    from raypose.heatmaps import decode_heatmaps

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


def test_mixed_people_and_animals_job(ray_session, moe_checkpoint, wholebody_checkpoint, write_job, tmp_path):
    """Persons -> COCO expert (MoE index 0), dogs -> AP-10K (index 3), cats -> a dense 133-keypoint model."""
    images = tmp_path / "images"
    images.mkdir()
    boxes = {"a.jpg": [[20.0, 30.0, 60.0, 150.0], [150.0, 100.0, 120.0, 80.0]], "b.jpg": [[10.0, 10.0, 90.0, 70.0]]}
    categories = {"a.jpg": ["person", "dog"], "b.jpg": ["cat"]}
    for name, image_boxes in boxes.items():
        draw_people(320, 240, np.array(image_boxes)).save(images / name)
    rows = [{"image_key": k, "bbox": b, "category": c, "score": 0.9}
            for k in boxes for b, c in zip(boxes[k], categories[k])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "boxes.parquet")
    spec = job_dict(images, tmp_path / "boxes.parquet", moe_checkpoint, tmp_path / "out")
    spec["boxes"].update(source="table", categories=["person", "dog", "cat"])
    spec["pose"].update(
        routing={"person": "coco", "dog": "ap10k", "cat": "wholebody"},
        # The tiny MoE has one head; say it is AP-10K's for the dog expert (else refused, see test_convert.py).
        experts={"wholebody": {"model": str(wholebody_checkpoint)}, "ap10k": {"head_schema": "ap10k17"}},
    )
    result = CliRunner().invoke(app, ["submit", str(write_job(spec))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = {r["category"]: r for r in pq.read_table(tmp_path / "out" / "keypoints").to_pylist()}
    assert {c: (r["expert"], r["keypoint_schema"], len(r["keypoint_x"])) for c, r in out.items()} == {
        "person": ("coco", "coco17", 17), "dog": ("ap10k", "ap10k17", 17), "cat": ("wholebody", "wholebody133", 133)}
    assert out["cat"]["model_id"] == str(wholebody_checkpoint) and out["dog"]["model_id"] == str(moe_checkpoint)
    assert out["dog"]["box_score"] == pytest.approx(0.9) and out["dog"]["instance_score"] <= 0.9

    # dataset_index reached the model: the dog's keypoints are the MoE's answer with index 3, not 0.
    from raypose.crops import center_scale_from_boxes, crop_image

    engine = PoseEngine(inspect_model(str(moe_checkpoint)))
    box = np.array([boxes["a.jpg"][1]])
    centers, scales = center_scale_from_boxes(box, engine.info.input_size)
    crop = crop_image(np.asarray(Image.open(images / "a.jpg").convert("RGB")), centers[0], scales[0], engine.info.input_size)
    dog = np.stack([out["dog"]["keypoint_x"], out["dog"]["keypoint_y"]], axis=1)
    as_ap10k, _ = engine.estimate(crop[None], centers, scales, dataset_index=3)
    as_coco, _ = engine.estimate(crop[None], centers, scales, dataset_index=0)
    np.testing.assert_allclose(dog, as_ap10k[0], atol=1e-3)
    assert np.abs(dog - as_coco[0]).max() > 1e-2

    sidecar = read_json(tmp_path / "out" / "keypoint_schemas.json")
    assert sorted(sidecar) == ["ap10k17", "coco17", "wholebody133"]
    assert len(sidecar["wholebody133"]["keypoints"]) == 133
    manifest = read_json(tmp_path / "out" / "manifest.json")
    assert manifest["experts"]["ap10k"]["dataset_index"] == 3 and manifest["experts"]["wholebody"]["dataset_index"] is None
