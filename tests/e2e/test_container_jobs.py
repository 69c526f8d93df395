"""WebDataset tars and Parquet files with image bytes: listing, reading, and whole jobs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job_dict, read_json
from typer.testing import CliRunner

from raypose.cli import app

runner = CliRunner()


def coco_boxes_by_image(coco_folder: Path) -> dict[str, list]:
    coco = read_json(coco_folder / "boxes.json")
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    boxes: dict[str, list] = {name: [] for name in names.values()}
    for ann in coco["annotations"]:
        boxes[names[ann["image_id"]]].append(ann["bbox"])
    return boxes


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(coco_folder, tmp_path_factory) -> Path:
    """Two WebDataset shards holding the three images, each with a .json of its boxes."""
    folder = tmp_path_factory.mktemp("wds")
    boxes = coco_boxes_by_image(coco_folder)
    names = sorted(boxes)
    for shard, members in enumerate([names[:2], names[2:]]):
        with tarfile.open(folder / f"shard-{shard:04d}.tar", "w") as tar:
            for name in members:
                stem = name.rsplit(".", 1)[0]
                add(tar, name, (coco_folder / "images" / name).read_bytes())
                add(tar, f"{stem}.json", json.dumps({"bbox": boxes[name], "category": ["person"] * len(boxes[name])}).encode())
                add(tar, f"{stem}.txt", b"a caption, ignored")
    return folder


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def files_run(ray_session, tiny_checkpoint, coco_folder, tmp_path_factory) -> dict:
    """The same images as plain files: what every container job must reproduce."""
    out = tmp_path_factory.mktemp("files") / "out"
    job = tmp_path_factory.mktemp("filesjob") / "job.yaml"
    job.write_text(json.dumps(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, out)))
    assert runner.invoke(app, ["submit", str(job)], catch_exceptions=False).exit_code == 0
    return keypoints_by_box(out)


def keypoints_by_box(output: Path) -> dict:
    rows = pq.read_table(output / "keypoints").to_pylist()
    return {(r["image_key"], tuple(round(v, 1) for v in r["bbox"])): r["keypoint_x"] for r in rows}


@pytest.mark.parametrize("boxes", ["inline", "coco"])
def test_webdataset_job(files_run, shards, tiny_checkpoint, coco_folder, write_job, tmp_path, boxes):
    spec = job_dict(shards, coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "out")
    spec["images"]["format"] = "webdataset"
    if boxes == "inline":
        spec["boxes"] = {"source": "inline"}
    result = runner.invoke(app, ["submit", str(write_job(spec))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ours = keypoints_by_box(tmp_path / "out")
    assert ours.keys() == files_run.keys()
    for key, xs in ours.items():
        assert xs == pytest.approx(files_run[key], abs=1e-3)
    sources = set(pq.read_table(tmp_path / "out" / "keypoints").column("box_source").to_pylist())
    assert sources == {"inline" if boxes == "inline" else "gt"}


def test_parquet_job_with_inline_boxes(files_run, parquet_images, tiny_checkpoint, write_job, tmp_path):
    spec = job_dict(parquet_images, None, tiny_checkpoint, tmp_path / "out")
    spec["images"]["format"] = "parquet"
    spec["boxes"] = {"source": "inline"}
    result = runner.invoke(app, ["submit", str(write_job(spec))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ours = keypoints_by_box(tmp_path / "out")
    assert ours.keys() == files_run.keys()
    for key, xs in ours.items():
        assert xs == pytest.approx(files_run[key], abs=1e-3)
    uris = set(pq.read_table(tmp_path / "out" / "keypoints").column("image_uri").to_pylist())
    assert any(uri.endswith("part-1.parquet#1") for uri in uris)
