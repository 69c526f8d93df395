"""End to end: `raypose submit` on embedded Ray, from JPEG bytes (local and s3://) to Parquet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import job_dict, read_json, s3_bucket
from PIL import Image
from typer.testing import CliRunner

from raypose.cli import app
from raypose.imaging.keypoint_schemas import COCO17
from raypose.schema import ERRORS_SCHEMA, KEYPOINTS_SCHEMA

reference = pytest.importorskip("transformers.models.vitpose.image_processing_pil_vitpose")
runner = CliRunner()


def submit(job: Path, *overrides: str):
    args = ["submit", str(job)]
    for override in overrides:
        args += ["--set", override]
    return runner.invoke(app, args, catch_exceptions=False)


def reference_rows(checkpoint, images_dir: Path, coco: dict) -> dict[int, np.ndarray]:
    """Keypoints by annotation id from the seed's pipeline, image by image."""
    import torch
    from transformers import VitPoseForPoseEstimation

    processor = reference.VitPoseImageProcessorPil.from_pretrained(checkpoint)
    model = VitPoseForPoseEstimation.from_pretrained(checkpoint).eval()
    out = {}
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        boxes = [a["bbox"] for a in anns]
        pil = Image.open(images_dir / image["file_name"]).convert("RGB")
        with torch.no_grad():
            outputs = model(**processor(pil, boxes=[boxes], return_tensors="pt"))
        results = processor.post_process_pose_estimation(outputs, boxes=[np.array(boxes, np.float32)])[0]
        for ann, result in zip(anns, results):
            out[ann["id"]] = result["keypoints"].numpy()
    return out


def check_against_reference(table, expected: dict[int, np.ndarray]):
    assert sorted(table.column("annotation_id").to_pylist()) == sorted(expected)
    for row in table.to_pylist():
        ours = np.stack([row["keypoint_x"], row["keypoint_y"]], axis=1)
        pitch = max(row["bbox"][2] * 0.75, row["bbox"][3]) * 1.25 / 63  # image px per heatmap px
        assert np.abs(ours - expected[row["annotation_id"]]).max() <= 0.01 * pitch + 1e-3


def test_submit_local_job_writes_plain_parquet(ray_session, tiny_checkpoint, coco_folder, write_job, tmp_path):
    output = tmp_path / "out"
    job = write_job(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, output))
    result = submit(job)
    assert result.exit_code == 0, result.output
    assert "3 images, 6 instances, 0 errors" in result.output
    assert str(output) in result.output.splitlines()[-1]

    table = pq.read_table(output / "keypoints")
    assert table.num_rows == 6
    assert table.schema.remove_metadata() == KEYPOINTS_SCHEMA  # plain Arrow types, no extension types
    meta = json.loads(table.schema.metadata[b"raypose"])
    assert meta["keypoint_schemas"]["coco17"]["keypoints"] == list(COCO17.keypoints)
    assert read_json(output / "keypoint_schemas.json")["coco17"]["skeleton"][0] == [15, 13]
    assert pq.read_table(output / "errors").num_rows == 0
    assert pq.read_schema(next((output / "errors").glob("*.parquet"))).remove_metadata() == ERRORS_SCHEMA

    manifest = read_json(output / "manifest.json")
    assert manifest["status"] == "succeeded"
    assert manifest["counts"]["instances"] == 6 and manifest["counts"]["images_with_boxes"] == 3
    assert manifest["throughput"]["crops_per_second"] > 0
    assert manifest["experts"]["coco"]["revision"].startswith("sha256:")
    assert not (output / "_tmp").exists()

    expected = reference_rows(tiny_checkpoint, coco_folder / "images", read_json(coco_folder / "boxes.json"))
    check_against_reference(table, expected)  # on CPU, by default, the pose actor makes the crops itself

    con = duckdb.connect()
    per_image = con.sql(
        f"SELECT image_key, count(*) AS n, max(len(keypoint_x)) AS k FROM '{output}/keypoints/*.parquet' "
        "GROUP BY image_key ORDER BY image_key"
    ).fetchall()
    assert per_image == [("img_0000.jpg", 2, 17), ("img_0001.jpg", 1, 17), ("img_0002.jpg", 3, 17)]

    # The output is refused a second time unless the job says overwrite.
    again = submit(job)
    assert again.exit_code == 2 and "output.mode" in again.output
    replaced = submit(job, "output.mode=overwrite", "pose.batch_size=2", "resources.crop_in=tasks",
                      "resources.pose_calls_per_actor=2")
    assert replaced.exit_code == 0, replaced.output
    # Crops in Ray tasks, three pose calls of 2 crops, two at a time in the actor.
    check_against_reference(pq.read_table(output / "keypoints"), expected)
    assert read_json(output / "manifest.json")["job_id"] != manifest["job_id"]
    on_device = submit(job, "output.mode=overwrite", "resources.crop_in=pose_device")
    assert on_device.exit_code == 0, on_device.output
    check_against_reference(pq.read_table(output / "keypoints"), expected)  # read tasks, crops cut in torch


@pytest.mark.parametrize("crop_in", ["auto", "pose_device"])
def test_bad_inputs_become_error_rows_and_the_job_finishes(ray_session, tiny_checkpoint, coco_folder, write_job, tmp_path,
                                                           crop_in):
    images = tmp_path / "images"
    shutil.copytree(coco_folder / "images", images)
    good = (images / "img_0000.jpg").read_bytes()
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (images / "text.jpg").write_bytes(b"this is not a jpeg")
    Image.new("RGB", (64, 48), "gray").save(images / "wrong size.jpg")
    coco = read_json(coco_folder / "boxes.json")
    extra = [("empty.jpg", [10, 10, 50, 50]), ("truncated.jpg", [10, 10, 50, 50]), ("text.jpg", [1, 1, 5, 5]),
             ("wrong size.jpg", [1, 1, 5, 5]), ("missing.jpg", [1, 1, 5, 5])]
    for name, box in extra:
        image_id = len(coco["images"]) + 1
        coco["images"].append({"id": image_id, "file_name": name, "width": 320, "height": 240})
        coco["annotations"].append({"id": 1000 + image_id, "image_id": image_id, "category_id": 1, "bbox": box, "area": 100})
    first = coco["images"][0]["id"]
    bad_boxes = [[float("nan"), 1, 5, 5], [10, 10, 0, 40], [10, 10, -5, 40], [5000, 5000, 10, 10], [-20, -20, 100, 120]]
    for i, box in enumerate(bad_boxes):
        coco["annotations"].append({"id": 2000 + i, "image_id": first, "category_id": 1, "bbox": box, "area": 100})
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(coco))

    # Blocks of two images: with auto, two CPU pose actors share them.
    job = write_job(job_dict(images, boxes, tiny_checkpoint, tmp_path / "out", limits={"max_errored_fraction": 1.0},
                             resources={"crop_in": crop_in, "images_per_crop_task": 2}))
    result = submit(job)
    assert result.exit_code == 0, result.output
    errors = {(r["image_key"], r["instance_index"]): (r["stage"], r["reason"])
              for r in pq.read_table(tmp_path / "out" / "errors").to_pylist()}
    assert errors[("empty.jpg", None)] == ("decode", "empty file (0 bytes)")
    assert errors[("truncated.jpg", None)][0] == "decode" and "truncated" in errors[("truncated.jpg", None)][1]
    assert errors[("text.jpg", None)] == ("decode", "not an image Pillow can decode (unknown format)")
    assert errors[("wrong size.jpg", None)] == ("decode", "image is 64x48 but the boxes file says 320x240")
    assert errors[("missing.jpg", None)][0] == "list"
    first_boxes = {index: reason for (key, index), (stage, reason) in errors.items() if key == "img_0000.jpg"}
    assert sorted(first_boxes) == [2, 3, 4, 5]  # NaN, zero, negative, outside; the partly-outside box is clipped
    assert "non-finite" in first_boxes[2] and "outside" in first_boxes[5]
    table = pq.read_table(tmp_path / "out" / "keypoints")
    assert table.num_rows == 7  # 6 good boxes + the clipped one
    clipped = [r for r in table.to_pylist() if r["annotation_id"] == 2004][0]
    assert clipped["bbox"] == [0.0, 0.0, 80.0, 100.0]
    manifest = read_json(tmp_path / "out" / "manifest.json")
    assert manifest["counts"]["errors"] == len(errors) == 9


def test_a_job_where_everything_fails_exits_non_zero(ray_session, tiny_checkpoint, write_job, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")
    (images / "b.jpg").write_bytes(b"garbage")
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]},
                        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5]}],
        "categories": [{"id": 1, "name": "person"}],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    job = write_job(job_dict(images, tmp_path / "boxes.json", tiny_checkpoint, tmp_path / "out"))
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 1
    assert "every input failed" in result.output
    assert pq.read_table(tmp_path / "out" / "errors").num_rows == 2
    assert read_json(tmp_path / "out" / "manifest.json")["status"] == "failed"


def test_submit_from_and_to_s3(ray_session, s3_server, tiny_checkpoint, coco_folder, write_job):
    import s3fs

    options = s3_bucket(s3_server, "raypose-test")
    fs = s3fs.S3FileSystem(**options)
    for image in (coco_folder / "images").iterdir():
        fs.put(str(image), f"raypose-test/coco/val/{image.name}")
    fs.put(str(coco_folder / "boxes.json"), "raypose-test/coco/annotations/boxes.json")

    spec = job_dict("s3://raypose-test/coco/val/", "s3://raypose-test/coco/annotations/boxes.json",
                    tiny_checkpoint, "s3://raypose-test/labels/run1/")
    spec["images"]["storage_options"] = options
    job = write_job(spec)
    result = submit(job)
    assert result.exit_code == 0, result.output
    assert "testing-secret" not in result.output

    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("raypose-test/labels/run1/")) == [
        "_job.json", "_lease", "_plan", "_shards", "errors", "keypoint_schemas.json", "keypoints", "manifest.json"]
    con = duckdb.connect()
    con.register_filesystem(fs)
    [(count, keys)] = con.sql(
        "SELECT count(*), count(DISTINCT image_key) FROM read_parquet('s3://raypose-test/labels/run1/keypoints/*.parquet')"
    ).fetchall()
    assert (count, keys) == (6, 3)
    table = pq.read_table("raypose-test/labels/run1/keypoints", filesystem=fs)
    assert set(table.column("image_uri").to_pylist()) == {f"s3://raypose-test/coco/val/img_000{i}.jpg" for i in range(3)}
    check_against_reference(table, reference_rows(tiny_checkpoint, coco_folder / "images", read_json(coco_folder / "boxes.json")))
    manifest = json.loads(fs.cat_file("raypose-test/labels/run1/manifest.json"))
    assert manifest["spec"]["images"]["storage_options"]["secret"] == "***"
    assert "testing-secret" not in json.dumps(manifest)


