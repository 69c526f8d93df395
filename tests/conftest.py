"""Shared fixtures: tiny checkpoints, drawn images with COCO boxes, one Ray per session."""

from __future__ import annotations

import json
import socket
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
    # Ray Data's console handler keeps the sys.stderr it was created with (at `import ray.data`);
    # created inside a CliRunner invocation, it would write to that run's closed stream ever after.
    import ray.data  # noqa: F401
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


@pytest.fixture(scope="session")
def s3_server() -> str:
    """A real S3 API: moto's standalone server on 127.0.0.1, one for the session; yields its endpoint URL."""
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_bucket(endpoint: str, bucket: str, key: str = "testing", secret: str = "testing-secret") -> dict:
    """Create `bucket` on the S3 server at `endpoint`; return the fsspec storage_options that reach it.

    moto accepts any credentials, so tests pick their own to check that none leaks.
    """
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"key": key, "secret": secret, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
