"""WebDataset tars and Parquet files with image bytes: listing, reading, and whole jobs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_json
from typer.testing import CliRunner

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.inputs.fetch import read_task_bytes
from raypose.inputs.listing import list_images

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


def test_tar_listing_reads_headers_and_finds_each_members_bytes(shards, coco_folder):
    images = ImagesSpec(path=str(shards), format="webdataset")
    table = list_images(images, BoxesSpec(source="inline"))
    assert table.column("image_key").to_pylist() == ["img_0000.jpg", "img_0001.jpg", "img_0002.jpg"]
    rows = table.to_pylist()
    assert rows[2]["image_uri"].endswith("shard-0001.tar#img_0002.jpg")
    assert [len(r["bbox"]) for r in rows] == [2, 1, 3]
    for row in rows:
        data = read_task_bytes(row, {}, "image", {})
        assert data == (coco_folder / "images" / row["image_key"]).read_bytes()


def test_parquet_listing_keys_from_image_path_without_reading_bytes(parquet_images, coco_folder):
    images = ImagesSpec(path=str(parquet_images), format="parquet")
    table = list_images(images, None)
    assert table.column("image_key").to_pylist() == ["img_0000.jpg", "img_0001.jpg", "img_0002.jpg"]
    assert "bbox" not in table.column_names
    row = table.to_pylist()[1]
    assert row["image_uri"].endswith("part-1.parquet#0") and row["length"] is None
    assert read_task_bytes(row, {}, "image", {}) == (coco_folder / "images" / "img_0001.jpg").read_bytes()


def test_parquet_without_names_keys_by_file_and_row(tmp_path, coco_folder):
    data = (coco_folder / "images" / "img_0000.jpg").read_bytes()
    pq.write_table(pa.table({"jpeg": [data, data]}), tmp_path / "raw.parquet")
    table = list_images(ImagesSpec(path=str(tmp_path), format="parquet", image_column="jpeg"), None)
    assert table.column("image_key").to_pylist() == ["raw/00000000", "raw/00000001"]
    assert read_task_bytes(table.to_pylist()[1], {}, "jpeg", {}) == data
    from raypose.errors import SpecError

    with pytest.raises(SpecError, match=r"images.image_column: 'image' is not a column"):
        list_images(ImagesSpec(path=str(tmp_path), format="parquet"), None)


