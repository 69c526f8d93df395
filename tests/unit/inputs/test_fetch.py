"""Fetching bytes: odd file names, missing and unreadable objects, and a read that fails as the row's error."""

from __future__ import annotations

import pyarrow as pa
import pytest
from helpers import listed, save_image

from raypose.config.spec import ImagesSpec
from raypose.errors import ImageError
from raypose.imaging.decode import decode_image
from raypose.inputs.fetch import read_bytes, read_image, read_images
from raypose.inputs.listing import list_images
from raypose.schema import IMAGE_TASK_SCHEMA

MAX_PIXELS = 1_000_000


# --- list_images ----------------------------------------------------------------------------


def test_read_bytes_odd_file_names(tmp_path):
    path = save_image(tmp_path / "odd names" / "a photo é ü 写真.jpg", size=(5, 4), color=(200, 100, 50))
    [(key, uri)] = listed(list_images(ImagesSpec(path=str(tmp_path / "odd names"))).images)
    assert key == "a photo é ü 写真.jpg"
    assert uri.startswith("file://")
    data = read_bytes(uri, {})
    assert data == path.read_bytes()
    assert decode_image(data, MAX_PIXELS).size == (5, 4)


def test_read_bytes_missing_object(tmp_path, memory_root):
    for uri in ((tmp_path / "gone.jpg").as_uri(), f"memory://{memory_root}/imgs/gone.jpg"):
        with pytest.raises(ImageError, match="not found in storage") as info:
            read_bytes(uri, {})
        assert info.value.stage == "read"


def test_read_bytes_unreadable_object(tmp_path):
    with pytest.raises(ImageError, match="cannot read: IsADirectoryError") as info:
        read_bytes(tmp_path.as_uri(), {})
    assert info.value.stage == "read"


# --- decode_image: hostile inputs -----------------------------------------------------------


def decode_error(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels)
    return info.value


def test_decode_non_image_named_jpg_through_storage(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("this is a text file with a .jpg name")
    [(_, uri)] = listed(list_images(ImagesSpec(path=str(tmp_path))).images)
    error = decode_error(read_bytes(uri, {}))
    assert "unknown format" in str(error) and error.stage == "decode"


def test_read_images_attaches_bytes_and_turns_a_failed_read_into_the_rows_error(tmp_path):
    path = save_image(tmp_path / "a.png")
    rows = [
        {"image_key": "a.png", "image_uri": path.as_uri(), "box_xywh": [[0, 0, 2, 2]]},
        {"image_key": "gone.png", "image_uri": (tmp_path / "gone.png").as_uri(), "box_xywh": [[0, 0, 2, 2]]},
        {"image_key": "none.png", "image_uri": (tmp_path / "none.png").as_uri(), "box_xywh": []},
    ]
    got = read_images(pa.Table.from_pylist(rows, schema=IMAGE_TASK_SCHEMA), storage_options={}).to_pylist()
    assert got[0]["image_bytes"] == path.read_bytes() and got[0]["error_stage"] is None
    assert (got[1]["image_bytes"], got[1]["error_stage"], got[1]["error_reason"]) == (None, "read", "not found in storage")
    assert got[2]["image_bytes"] is None and got[2]["error_stage"] is None  # no box: nothing to read


def test_read_image_of_files_of_their_own_even_named_like_a_tar_member(tmp_path):
    for name in ("a.jpg", "x.tar#y.jpg", "p.parquet#3"):
        path = tmp_path / name
        path.write_bytes(name.encode())
        assert read_image(f"file://{path}", {}) == path.read_bytes()
    with pytest.raises(ImageError, match="not found in storage") as info:
        read_image(f"file://{tmp_path}/gone.tar#y.jpg", {})
    assert info.value.stage == "read"


def test_images_are_read_from_files_tar_members_and_parquet_rows(tmp_path):
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypose.errors import ImageError
    from raypose.inputs.fetch import read_image

    (tmp_path / "plain.jpg").write_bytes(b"plain")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, data in (("a/one.jpg", b"first"), ("a/two.jpg", b"second")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"img": [{"bytes": b"row0", "path": "x"}, {"bytes": b"row1", "path": "y"}]}),
                   tmp_path / "part.parquet")
    root = tmp_path.as_uri()
    assert read_image(f"{root}/plain.jpg", {}) == b"plain"
    assert read_image(f"{root}/shard.tar#a/two.jpg", {}) == b"second"
    assert read_image(f"{root}/part.parquet#1", {}, image_column="img") == b"row1"
    for missing in (f"{root}/shard.tar#a/three.jpg", f"{root}/part.parquet#5", f"{root}/gone.jpg"):
        with pytest.raises(ImageError):
            read_image(missing, {}, image_column="img")
