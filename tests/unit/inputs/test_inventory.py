"""S3 Inventory reports as a listing: CSV (URL-encoded keys) and Parquet data files, current objects only."""

from __future__ import annotations

import gzip
import io
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import s3_bucket

from raypose.config.spec import ImagesSpec
from raypose.errors import SpecError
from raypose.inputs.listing import find_in_parallel, iter_images, list_images

OBJECTS = [  # key, size, etag, is_latest, is_delete_marker
    ("photos/b.jpg", 10, "e-b", True, False),
    ("photos/a b+c.jpg", 11, "e-a", True, False),
    ("photos/old.jpg", 12, "e-old", False, False),  # an older version
    ("photos/gone.jpg", 0, None, True, True),  # deleted since
    ("photos/notes.txt", 5, "e-n", True, False),
    ("other/x.jpg", 7, "e-x", True, False),
]


def inventory_at(s3_server, file_format: str) -> tuple[str, dict]:
    options = s3_bucket(s3_server, f"inventory-{file_format}")
    fs = fsspec.filesystem("s3", **options)
    dest = f"inventory-{file_format}"
    if file_format == "CSV":
        def quoted(value):
            return "" if value is None else f'"{value}"'
        lines = [",".join(quoted(v) for v in ("src", key.replace(" ", "+").replace("+c", "%2Bc"), size, etag,
                                              str(latest).lower(), str(marker).lower()))
                 for key, size, etag, latest, marker in OBJECTS]
        data = gzip.compress(("\n".join(lines) + "\n").encode())
        data_key, schema = "inv/src/cfg/data/part-0.csv.gz", "Bucket, Key, Size, ETag, IsLatest, IsDeleteMarker"
    else:
        buffer = io.BytesIO()
        pq.write_table(pa.table({
            "bucket": ["src"] * len(OBJECTS), "key": [o[0] for o in OBJECTS], "size": [o[1] for o in OBJECTS],
            "e_tag": [o[2] for o in OBJECTS], "is_latest": [o[3] for o in OBJECTS],
            "is_delete_marker": [o[4] for o in OBJECTS]}), buffer)
        data, data_key, schema = buffer.getvalue(), "inv/src/cfg/data/part-0.parquet", "message s3.inventory {}"
    fs.pipe(f"{dest}/{data_key}", data)
    manifest = {"sourceBucket": "src", "destinationBucket": f"arn:aws:s3:::{dest}", "version": "2016-11-30",
                "fileFormat": file_format, "fileSchema": schema, "files": [{"key": data_key, "size": len(data)}]}
    fs.pipe(f"{dest}/inv/src/cfg/2026-12-01T00-00Z/manifest.json", json.dumps(manifest).encode())
    return f"s3://{dest}/inv/src/cfg/2026-12-01T00-00Z/manifest.json", options


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_an_inventory_lists_the_current_images_under_its_prefix(s3_server, file_format):
    manifest, options = inventory_at(s3_server, file_format)
    table = list_images(ImagesSpec(path=manifest, storage_options=options, inventory_prefix="photos/")).images
    assert table.to_pylist() == [
        {"image_key": "a b+c.jpg", "image_uri": "s3://src/photos/a b+c.jpg", "image_size": 11, "image_version": "ETag:e-a"},
        {"image_key": "b.jpg", "image_uri": "s3://src/photos/b.jpg", "image_size": 10, "image_version": "ETag:e-b"},
    ]
    everything = list_images(ImagesSpec(path=manifest, storage_options=options)).images
    assert everything.column("image_key").to_pylist() == ["other/x.jpg", "photos/a b+c.jpg", "photos/b.jpg"]
    streamed = iter_images(ImagesSpec(path=manifest, storage_options=options, inventory_prefix="photos/"))
    assert pa.concat_tables(list(streamed)).to_pylist() == table.to_pylist()  # as the plan reads it


def test_an_inventory_that_is_not_one_is_a_spec_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"files": []}')
    with pytest.raises(SpecError, match="is not a readable S3 Inventory manifest.json"):
        list_images(ImagesSpec(path=str(tmp_path / "manifest.json")))


def test_a_folder_is_listed_by_its_sub_folders_side_by_side(tmp_path):
    for name in ("a/1.jpg", "a/b/2.jpg", "c/3.jpg", "top.jpg", "d/e/f/4.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    fs = fsspec.filesystem("file")
    assert find_in_parallel(fs, str(tmp_path)).keys() == fs.find(str(tmp_path), detail=True).keys()


def test_an_inventory_streams_in_key_order_from_data_files_in_any_order(s3_server, monkeypatch):
    from functools import partial

    from raypose.inputs import listing as listing_module
    from raypose.inputs.key_order import sorted_by_key

    monkeypatch.setattr(listing_module, "sorted_by_key", partial(sorted_by_key, run_rows=5, batch_rows=2))
    options = s3_bucket(s3_server, "inventory-streamed")
    fs = fsspec.filesystem("s3", **options)
    keys = [f"photos/{i:03d}.jpg" for i in np.random.default_rng(4).permutation(40)] + ["photos/notes.txt"]
    files = []
    for part in range(3):  # three data files, each in no order
        data_key = f"inv/src/cfg/data/part-{part}.parquet"
        chunk = keys[part::3]
        buffer = io.BytesIO()
        pq.write_table(pa.table({"bucket": ["src"] * len(chunk), "key": chunk, "size": list(range(len(chunk))),
                                 "e_tag": [f"e{part}"] * len(chunk)}), buffer)
        fs.pipe(f"inventory-streamed/{data_key}", buffer.getvalue())
        files.append({"key": data_key})
    manifest = {"sourceBucket": "src", "destinationBucket": "arn:aws:s3:::inventory-streamed",
                "fileFormat": "Parquet", "fileSchema": "message s3.inventory {}", "files": files}
    fs.pipe("inventory-streamed/inv/manifest.json", json.dumps(manifest).encode())
    images = ImagesSpec(path="s3://inventory-streamed/inv/manifest.json", storage_options=options,
                        inventory_prefix="photos/")
    chunks = list(iter_images(images, chunk_rows=7))
    assert [c.num_rows for c in chunks] == [7, 7, 7, 7, 7, 5]
    assert pa.concat_tables(chunks).to_pylist() == list_images(images).images.to_pylist()
    assert pa.concat_tables(chunks).column("image_key").to_pylist() == [f"{i:03d}.jpg" for i in range(40)]


def test_an_inventory_without_images_under_the_prefix_says_so_when_streamed(s3_server):
    manifest, options = inventory_at(s3_server, "Parquet")
    with pytest.raises(SpecError, match="no images in the inventory .* under images.inventory_prefix 'nothing/'"):
        next(iter_images(ImagesSpec(path=manifest, storage_options=options, inventory_prefix="nothing/")))
