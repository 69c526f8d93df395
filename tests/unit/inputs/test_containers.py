"""WebDataset tars and Parquet files with image bytes: listing them without reading bytes, and fetching one image."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.inputs.fetch import read_task_bytes
from raypose.inputs.listing import list_images

runner = CliRunner()


def test_tar_listing_reads_headers_and_finds_each_members_bytes(webdataset_shards, coco_folder):
    images = ImagesSpec(path=str(webdataset_shards), format="webdataset")
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


