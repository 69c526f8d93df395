"""Jobs over WebDataset tars and Parquet files give the rows a job over the same images as files gives."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import job_dict
from typer.testing import CliRunner

from raypose.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files_run(coco_job_output) -> dict:
    """The same images as plain files: what every container job must reproduce."""
    return keypoints_by_box(coco_job_output)


def keypoints_by_box(output: Path) -> dict:
    rows = pq.read_table(output / "keypoints").to_pylist()
    return {(r["image_key"], tuple(round(v, 1) for v in r["bbox"])): r["keypoint_x"] for r in rows}


@pytest.mark.parametrize("boxes", ["inline", "coco"])
def test_webdataset_job(files_run, webdataset_shards, tiny_checkpoint, coco_folder, write_job, tmp_path, boxes):
    spec = job_dict(webdataset_shards, coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "out")
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
