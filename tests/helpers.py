"""Plain helpers the tests share: job dicts, image tasks, stand-in routings, reference boxes, S3 buckets, files.

Fixtures live in conftest.py; tests import these with `from helpers import ...` (pytest puts tests/ on sys.path:
it holds conftest.py and no __init__.py).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]  # the repository's root: jobs/, docs/, infra/, benchmarks/


# Boxes inside, across the border, tiny, wide, tall, fractional, the whole image.
REFERENCE_BOXES = [
    [10, 20, 50, 80],
    [-10, -5, 200, 150],
    [100, 60, 30, 20],
    [3.3, 7.7, 40.2, 10.1],
    [0, 0, 160, 120],
    [150, 110, 30, 40],
    [40.5, 0.25, 8.0, 119.0],
]


def image_task(path: Path, boxes: list[list[float]], *, categories: list[str] | None = None,
               size: tuple[int, int] | None = None, first_annotation: int = 1) -> dict:
    """One image task (schema.IMAGE_TASK_SCHEMA) for the file at `path`, keyed by its name, with ground-truth boxes."""
    n = len(boxes)
    return {
        "image_key": path.name, "image_uri": path.as_uri(),
        "expected_width": size[0] if size else None, "expected_height": size[1] if size else None,
        "box_xywh": boxes, "annotation_id": list(range(first_annotation, first_annotation + n)),
        "category": categories or ["person"] * n, "box_score": [None] * n, "box_source": "gt",
    }


def task_table(*tasks: dict):
    """Image tasks as the Arrow batch the stages take."""
    from raypose.schema import IMAGE_TASK_SCHEMA

    return pa.Table.from_pylist(list(tasks), schema=IMAGE_TASK_SCHEMA)


def routing_for(input_sizes: dict[str, tuple[int, int]], rules: dict[str, str] | None = None, default: str = "coco"):
    """A Routing of experts known only by their input size (width, height): enough for the crop stage."""
    from raypose.models.routing import Expert, Routing
    from raypose.models.vitpose import ModelInfo

    experts = {
        name: Expert(name=name, dataset_index=None, keypoint_schema="coco17",
                     model=ModelInfo(model_id=f"stand-in/{name}", revision="0", input_size=tuple(size), num_keypoints=17,
                                     num_experts=1, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
        for name, size in input_sizes.items()
    }
    return Routing(experts=experts, rules=dict(rules or {}), default=default)


def crop_options(input_sizes: dict[str, tuple[int, int]] | None = None, rules: dict[str, str] | None = None,
                 routing=None, **options):
    """The crop stage's options for stand-in experts (`routing_for`) or a real routing."""
    from raypose.pipeline.crop_stage import CropOptions

    return CropOptions(routing=routing or routing_for(input_sizes, rules), **options)


def gaussian_blur(heatmaps, kernel: int, sigma: float, border: str = "reflect"):
    """Separable Gaussian smoothing of whole heatmaps (N, K, h, w): `heatmaps.blurred_at` every pixel (a reference)."""
    import torch

    from raypose.imaging.heatmaps import blurred_at

    n, k, height, width = heatmaps.shape
    device = heatmaps.device
    planes = torch.arange(n * k, device=device).view(-1, 1, 1)
    ys, xs = torch.arange(height, device=device).view(1, -1, 1), torch.arange(width, device=device).view(1, 1, -1)
    return blurred_at(heatmaps, planes, ys, xs, kernel, sigma, border).reshape(n, k, height, width)


DETECTOR_LABELS = ["person", "bicycle", "dog", "cat"]
DETECTOR_THRESHOLD = 0.005  # random weights score near the focal-loss prior (~0.01)


def direct_detections(checkpoint, image, threshold: float):
    """The seed's detection step: processor -> RTDetrForObjectDetection -> post_process_object_detection."""
    import torch
    from transformers import AutoImageProcessor, RTDetrForObjectDetection

    processor = AutoImageProcessor.from_pretrained(checkpoint)
    model = RTDetrForObjectDetection.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    return processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=[(image.shape[0], image.shape[1])]
    )[0]


def job_dict(images: Path | str, boxes: Path | str, model: Path | str, output: Path | str, **sections) -> dict:
    """A minimal valid job spec as a dict; keyword sections are merged in.

    float32, as the reference runs: `auto` is bfloat16 on CPUs that have it natively
    (tests/unit/pipeline/test_layout.py), which moves keypoints by more than the parity tolerance.
    """
    spec = {
        "name": "test-job",
        "images": {"path": str(images)},
        "boxes": {"source": "coco", "path": str(boxes)},
        "pose": {"model": str(model), "batch_size": 4, "dtype": "float32"},
        "output": {"path": str(output)},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    return spec


def read_json(path: Path) -> dict:
    """The JSON document at `path`."""
    return json.loads(Path(path).read_text())


def s3_bucket(endpoint: str, bucket: str, key: str = "testing", secret: str = "testing-secret") -> dict:
    """Create `bucket` on the S3 server at `endpoint`; return the fsspec storage_options that reach it.

    moto accepts any credentials, so tests pick their own to check that none leaks.
    """
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"key": key, "secret": secret, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}


def coco_boxes_by_image(coco_folder: Path) -> dict[str, list]:
    """The boxes of `coco_folder`/boxes.json by image file name."""
    coco = read_json(coco_folder / "boxes.json")
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    boxes: dict[str, list] = {name: [] for name in names.values()}
    for ann in coco["annotations"]:
        boxes[names[ann["image_id"]]].append(ann["bbox"])
    return boxes


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add `data` to `tar` as the file `name`."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def save_image(path: Path, size=(4, 3), color=(10, 20, 30)) -> Path:
    """A plain RGB image file at `path` (folders made)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def listed(table) -> list[tuple[str, str]]:
    """A listing's (image_key, image_uri) pairs."""
    return list(zip(table.column("image_key").to_pylist(), table.column("image_uri").to_pylist()))


def pose_rows(*rows: dict) -> pa.Table:
    """Pose-stage rows: (image, instance) with keypoints, or with an error; `image_rows` says how many the image has."""
    filled = []
    for row in rows:
        labelled = row.get("error_stage") is None and row.get("instance_index") is not None
        filled.append({
            "image_uri": f"file:///{row['image_key']}", "box_source": "gt", "image_width": 64, "image_height": 48,
            "expert": "coco" if labelled else None, "keypoint_schema": "coco17" if labelled else None,
            "keypoint_x": [1.0] * 17 if labelled else None, "keypoint_y": [2.0] * 17 if labelled else None,
            "keypoint_score": [0.5] * 17 if labelled else None, "instance_score": 0.5 if labelled else None,
            "image_rows": 1, "shard": 0, **row,
        })
    from raypose.schema import POSE_OUTPUT_SCHEMA

    return pa.Table.from_pylist(filled, schema=POSE_OUTPUT_SCHEMA)
