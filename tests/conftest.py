"""Shared fixtures: tiny checkpoints, drawn images with COCO boxes, one Ray per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raypose.synthetic import make_checkpoint, make_coco_dataset


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random 2-layer ViTPose (COCO-17 head, 256x192 input) saved with save_pretrained."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "vitpose-tiny", preset="tiny")


@pytest.fixture(scope="session")
def coco_folder(tmp_path_factory) -> Path:
    """Three JPEGs of different sizes and aspects with 1-3 drawn people each, and boxes.json."""
    folder = tmp_path_factory.mktemp("coco")
    make_coco_dataset(folder, [(320, 240), (240, 320), (400, 200)], persons_per_image=[2, 1, 3])
    return folder


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def write_job(tmp_path):
    """Write a job YAML from a dict and return its path."""

    def write(spec: dict, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


def job_dict(images: Path | str, boxes: Path | str, model: Path | str, output: Path | str, **sections) -> dict:
    """A minimal valid job spec as a dict; keyword sections are merged in."""
    spec = {
        "name": "test-job",
        "images": {"path": str(images)},
        "boxes": {"source": "coco", "path": str(boxes)},
        "pose": {"model": str(model), "batch_size": 4},
        "output": {"path": str(output)},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    return spec


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
