"""WebDataset tars and Parquet files with image bytes: listing them without reading bytes, and fetching one image."""

from __future__ import annotations

import io
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.errors import ImageError
from raypose.inputs.fetch import read_image, read_task_bytes
from raypose.inputs.listing import list_images

runner = CliRunner()


def test_tar_listing_reads_headers_and_finds_each_members_bytes(webdataset_shards, coco_folder):
    images = ImagesSpec(path=str(webdataset_shards), format="webdataset")
    table = list_images(images, BoxesSpec(source="inline")).images
    assert table.column("image_key").to_pylist() == ["img_0000.jpg", "img_0001.jpg", "img_0002.jpg"]
    rows = table.to_pylist()
    assert rows[2]["image_uri"].endswith("shard-0001.tar#img_0002.jpg")
    assert [len(r["bbox"]) for r in rows] == [2, 1, 3]
    for row in rows:
        data = read_task_bytes(row, {}, "image", {})
        assert data == (coco_folder / "images" / row["image_key"]).read_bytes()


def test_parquet_listing_keys_from_image_path_without_reading_bytes(parquet_images, coco_folder):
    images = ImagesSpec(path=str(parquet_images), format="parquet")
    table = list_images(images, None).images
    assert table.column("image_key").to_pylist() == ["img_0000.jpg", "img_0001.jpg", "img_0002.jpg"]
    assert "bbox" not in table.column_names
    row = table.to_pylist()[1]
    assert row["image_uri"].endswith("part-1.parquet#0") and row["length"] is None
    assert read_task_bytes(row, {}, "image", {}) == (coco_folder / "images" / "img_0001.jpg").read_bytes()
    assert read_image(row["image_uri"], {}) == (coco_folder / "images" / "img_0001.jpg").read_bytes()
    with pytest.raises(ImageError, match="cannot read from .*part-1.parquet: IndexError"):
        read_image(row["image_uri"].replace("#0", "#7"), {})


def test_parquet_without_names_keys_by_file_and_row(tmp_path, coco_folder):
    data = (coco_folder / "images" / "img_0000.jpg").read_bytes()
    pq.write_table(pa.table({"jpeg": [data, data]}), tmp_path / "raw.parquet")
    table = list_images(ImagesSpec(path=str(tmp_path), format="parquet", image_column="jpeg"), None).images
    assert table.column("image_key").to_pylist() == ["raw/00000000", "raw/00000001"]
    assert read_task_bytes(table.to_pylist()[1], {}, "jpeg", {}) == data
    from raypose.errors import SpecError

    with pytest.raises(SpecError, match=r"images.image_column: 'image' is not a column"):
        list_images(ImagesSpec(path=str(tmp_path), format="parquet"), None)




# --- every tar member accounted for ------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    return info, data


def test_tar_members_that_are_not_images_are_error_rows_or_counted(tmp_path, coco_folder):
    jpg, png = ((coco_folder / "images" / f"img_000{i}.jpg").read_bytes() for i in (0, 1))
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # a member name that is not UTF-8
    members = [
        _member("imgs", tarfile.DIRTYPE),
        _member("imgs/a.jpg", data=b"first, replaced"),
        _member("imgs/a.jpg", data=jpg),  # the same name again: tar extracts this one
        _member("imgs/a.png", data=png),  # the same stem, another image
        _member("imgs/a.json", data=b'{"bbox": [[1, 2, 3, 4]]}'),
        _member(f"imgs/{latin1}", data=png),
        _member("imgs/hard.jpg", tarfile.LNKTYPE, link="imgs/a.png"),  # read through its target
        _member("imgs/hard_gone.jpg", tarfile.LNKTYPE, link="imgs/nowhere.jpg"),
        _member("imgs/soft.jpg", tarfile.SYMTYPE, link="a.png"),
        _member("imgs/soft.json", tarfile.SYMTYPE, link="a.json"),
        _member("imgs/fifo.jpg", tarfile.FIFOTYPE),
    ]
    with tarfile.open(tmp_path / "shard.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    listing = list_images(ImagesSpec(path=str(tmp_path), format="webdataset"), BoxesSpec(source="inline"))

    images = {row["image_key"]: row for row in listing.images.to_pylist()}
    assert sorted(images) == ["imgs/a.jpg", "imgs/a.png", "imgs/caf%E9.jpg", "imgs/hard.jpg"]
    expected = {"imgs/a.jpg": jpg, "imgs/a.png": png, "imgs/caf%E9.jpg": png, "imgs/hard.jpg": png}
    cache: dict = {}
    for key, row in images.items():
        assert row["image_uri"] == f"file://{tmp_path}/shard.tar#{key}"
        assert read_task_bytes(row, {}, "image", {}) == expected[key]
        assert read_image(row["image_uri"], {}, cache=cache) == expected[key]  # as render and export read it
    with pytest.raises(ImageError, match="not found in storage: no member 'imgs/soft.jpg'"):
        read_image(f"file://{tmp_path}/shard.tar#imgs/soft.jpg", {})
    assert images["imgs/a.jpg"]["bbox"] == images["imgs/a.png"]["bbox"] == [[1, 2, 3, 4]]  # one sample, two images

    errors = {(row["image_key"], row["stage"]): row["reason"] for row in listing.errors.to_pylist()}
    assert sorted(errors) == [(f"imgs/{name}", "list") for name in ("a.jpg", "fifo.jpg", "hard_gone.jpg", "soft.jpg")]
    assert "followed by another of the same name" in errors["imgs/a.jpg", "list"]
    assert "hard link to 'imgs/nowhere.jpg'" in errors["imgs/hard_gone.jpg", "list"]
    assert "symbolic link (to 'a.png'): not followed" in errors["imgs/soft.jpg", "list"]
    assert "special file" in errors["imgs/fifo.jpg", "list"]
    assert listing.errors.column("image_uri")[0].as_py().startswith(f"file://{tmp_path}/shard.tar#")
    assert listing.counts == {"tar_directories": 1, "tar_other_members": 1}  # the folder; soft.json


def test_parquet_null_key_is_an_error_row_not_the_key_none(tmp_path, coco_folder):
    data = (coco_folder / "images" / "img_0000.jpg").read_bytes()
    pq.write_table(pa.table({"image": [data] * 3, "name": ["x.jpg", None, "z.jpg"]}), tmp_path / "p.parquet")
    listing = list_images(ImagesSpec(path=str(tmp_path), format="parquet", key_column="name"), None)
    assert listing.images.column("image_key").to_pylist() == ["x.jpg", "z.jpg"]
    assert listing.errors.select(["image_key", "image_uri", "stage", "reason"]).to_pylist() == [{
        "image_key": None, "image_uri": f"file://{tmp_path}/p.parquet#1", "stage": "list",
        "reason": "images.key_column 'name' is null in row 1"}]
