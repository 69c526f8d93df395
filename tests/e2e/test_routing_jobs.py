"""A mixed job end to end: people and animals routed to their experts, each row with its expert and schema."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import job_dict, read_json
from PIL import Image
from typer.testing import CliRunner

from raypose.cli import app
from raypose.models.vitpose import PoseEngine, inspect_model
from raypose.testing.synthetic import draw_people, make_checkpoint


@pytest.fixture(scope="module")
def wholebody_checkpoint(tmp_path_factory):
    """A tiny dense ViTPose with a 133-channel (COCO-WholeBody) head."""
    return make_checkpoint(tmp_path_factory.mktemp("wb") / "vitpose-wholebody-tiny", num_keypoints=133)


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
    from raypose.imaging.crop_cpu import crop_image
    from raypose.imaging.geometry import center_scale_from_boxes

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
