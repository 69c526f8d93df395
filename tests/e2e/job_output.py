"""One real job output shared by the output-reading tests (export, render, inspect, docs).

The job runs once per test session through `raypose submit` on the session's Ray, over the
the coco_folder fixture's drawn COCO images plus: an image in a sub-folder with spaces and parentheses in
its name (file-name sanitizing), an empty file (a decode error), a zero-width box (a box
error), a listed image missing from storage (a list error), and a dog routed to the AP-10K
expert, so the output holds two keypoint schemas, with the flip uncertainty columns. Its boxes come from a COCO
file whose annotations carry keypoints (the drawn stick figures' joints), so exports can be
evaluated against the GT they came from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from helpers import job_dict
from typer.testing import CliRunner

from raypose.cli import app
from raypose.imaging.keypoint_schemas import COCO17
from raypose.testing.synthetic import figure_keypoints

DOG_SCHEMA = "ap10k17"
NESTED_KEY = "nested dir/odd name (1).jpg"


@dataclass(frozen=True)
class SharedJob:
    output: Path
    images: Path
    gt: Path  # COCO file with keypoints, the boxes file of the job
    coco: dict


_JOBS: dict[str, SharedJob] = {}


def shared_job(tmp_path_factory, coco_folder: Path, checkpoint: Path) -> SharedJob:
    """Run (once per session) the shared job and return where its output and inputs are."""
    if "job" in _JOBS:
        return _JOBS["job"]
    root = tmp_path_factory.mktemp("shared-job")
    images = root / "images"
    shutil.copytree(coco_folder / "images", images)
    (images / "nested dir").mkdir()
    shutil.copy(images / "img_0001.jpg", images / NESTED_KEY)
    (images / "broken.jpg").write_bytes(b"")

    coco = json.loads((coco_folder / "boxes.json").read_text())
    next_image = max(im["id"] for im in coco["images"]) + 1
    img1 = next(im for im in coco["images"] if im["file_name"] == "img_0001.jpg")
    extra_images = [
        {"id": next_image, "file_name": NESTED_KEY, "width": img1["width"], "height": img1["height"]},
        {"id": next_image + 1, "file_name": "broken.jpg", "width": 100, "height": 100},
        {"id": next_image + 2, "file_name": "missing.jpg", "width": 100, "height": 100},
    ]
    next_ann = max(a["id"] for a in coco["annotations"]) + 1
    img1_boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == img1["id"]]
    extra_anns = [
        {"id": next_ann, "image_id": next_image, "bbox": img1_boxes[0]},
        {"id": next_ann + 1, "image_id": next_image + 1, "bbox": [10, 10, 50, 50]},
        {"id": next_ann + 2, "image_id": next_image + 2, "bbox": [10, 10, 50, 50]},
        {"id": next_ann + 3, "image_id": img1["id"], "bbox": [10, 10, 0, 40]},
    ]
    for ann in extra_anns:
        ann.update(category_id=1, iscrowd=0, area=round(ann["bbox"][2] * ann["bbox"][3], 2))
    coco["images"] += extra_images
    coco["annotations"] += extra_anns
    # One box of the 3-box image is a dog, which the routing sends to the AP-10K expert (ap10k17 schema).
    img2 = next(im for im in coco["images"] if im["file_name"] == "img_0002.jpg")
    [*_, dog] = [a for a in coco["annotations"] if a["image_id"] == img2["id"]]
    dog["category_id"] = 2
    coco["categories"].append({"id": 2, "name": "dog", "supercategory": "animal"})
    for ann in coco["annotations"]:
        ann["keypoints"] = figure_keypoints(ann["bbox"])
        ann["num_keypoints"] = 17
    for category in coco["categories"]:
        category.update(keypoints=list(COCO17.keypoints), skeleton=[[a + 1, b + 1] for a, b in COCO17.skeleton])
    gt = root / "person_keypoints.json"
    gt.write_text(json.dumps(coco))

    output = root / "out"
    job = root / "job.yaml"
    spec = job_dict(images, gt, checkpoint, output)
    spec["name"] = "shared-job"
    spec["boxes"]["categories"] = ["person", "dog"]
    spec["pose"]["routing"] = {"dog": "ap10k"}
    # the tiny random checkpoint has 17 heatmaps: read them as AP-10K's for the dog
    spec["pose"]["experts"] = {"ap10k": {"head_schema": "ap10k17"}}
    spec["pose"]["uncertainty"] = "flip"  # the flip columns, for the review exports and the docs' recipes
    spec["limits"] = {"max_errored_fraction": 0.5}  # 3 of its 10 inputs fail on purpose
    job.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["submit", str(job)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    _JOBS["job"] = SharedJob(output=output, images=images, gt=gt, coco=coco)
    return _JOBS["job"]
