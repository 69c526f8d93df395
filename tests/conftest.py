"""Shared fixtures: tiny checkpoints, drawn images with COCO boxes, WebDataset and Parquet inputs, one Ray per session.

tests/unit/<package>/ mirrors raypose/<package>/ and never starts Ray; tests/e2e/ runs jobs. Plain helpers
(job_dict, image_task, ...) are in helpers.py.
"""

from __future__ import annotations

import json
import socket
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import DETECTOR_LABELS, add_tar_member, coco_boxes_by_image, job_dict
from raypose.testing.synthetic import make_checkpoint, make_coco_dataset


@pytest.fixture(scope="session")
def detector_checkpoint(tmp_path_factory) -> Path:
    """A tiny random RT-DETR with DETECTOR_LABELS, saved with save_pretrained."""
    from raypose.testing.synthetic import make_detector_checkpoint

    return make_detector_checkpoint(tmp_path_factory.mktemp("detr") / "rtdetr-tiny", DETECTOR_LABELS)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random 2-layer ViTPose (COCO-17 head, 256x192 input) saved with save_pretrained."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "vitpose-tiny", preset="tiny")


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory) -> Path:
    """As published in transformers format: a ViTPose++ (6 experts) with one 17-channel head, no raypose_schema."""
    return make_checkpoint(tmp_path_factory.mktemp("plus") / "vitpose-plus-tiny", preset="tiny-plus")


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

    from raypose.pipeline.runtime import EMBEDDED_RAY_CONFIG

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=EMBEDDED_RAY_CONFIG)
    # Ray Data's console handler keeps the sys.stderr it was created with (at `import ray.data`);
    # created inside a CliRunner invocation, it would write to that run's closed stream ever after.
    import ray.data  # noqa: F401
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def coco_job_output(ray_session, coco_folder, tiny_checkpoint, tmp_path_factory) -> Path:
    """`raypose submit` of `job_dict` over coco_folder, once a session: the output other inputs must reproduce."""
    from typer.testing import CliRunner

    from raypose.cli import app

    folder = tmp_path_factory.mktemp("coco-job")
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint,
                                           folder / "out")))
    result = CliRunner().invoke(app, ["submit", str(job)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return folder / "out"


@pytest.fixture
def write_job(tmp_path):
    """Write a job YAML from a dict and return its path."""

    def write(spec: dict, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


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


@pytest.fixture(scope="session")
def webdataset_shards(coco_folder, tmp_path_factory) -> Path:
    """Two WebDataset shards holding the three images, each with a .json of its boxes."""
    folder = tmp_path_factory.mktemp("wds")
    boxes = coco_boxes_by_image(coco_folder)
    names = sorted(boxes)
    for shard, members in enumerate([names[:2], names[2:]]):
        with tarfile.open(folder / f"shard-{shard:04d}.tar", "w") as tar:
            for name in members:
                stem = name.rsplit(".", 1)[0]
                add_tar_member(tar, name, (coco_folder / "images" / name).read_bytes())
                add_tar_member(tar, f"{stem}.json", json.dumps({"bbox": boxes[name], "category": ["person"] * len(boxes[name])}).encode())
                add_tar_member(tar, f"{stem}.txt", b"a caption, ignored")
    return folder


@pytest.fixture(scope="session")
def parquet_images(coco_folder, tmp_path_factory) -> Path:
    """The HF datasets layout: an `image` struct {bytes, path} and a `bbox` list column, in two files."""
    folder = tmp_path_factory.mktemp("pq")
    boxes = coco_boxes_by_image(coco_folder)
    names = sorted(boxes)
    for part, members in enumerate([names[:1], names[1:]]):
        table = pa.table({
            "image": [{"bytes": (coco_folder / "images" / n).read_bytes(), "path": n} for n in members],
            "bbox": [boxes[n] for n in members],
        })
        pq.write_table(table, folder / f"part-{part}.parquet")
    return folder


@pytest.fixture
def memory_root():
    """Four objects on fsspec's memory filesystem, one hidden and one not an image."""
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/raypose-test-{uuid.uuid4().hex}"
    fs.pipe(f"{root}/imgs/p/q.jpg", b"q-bytes")
    fs.pipe(f"{root}/imgs/r.PNG", b"r-bytes")
    fs.pipe(f"{root}/imgs/.s.png", b"hidden")
    fs.pipe(f"{root}/imgs/t.txt", b"text")
    yield root
    fs.rm(root, recursive=True)
