"""S3 Inventory reports as a listing: how AWS users enumerate a bucket of 100M objects without listing it.

An inventory configuration makes S3 write, daily or weekly, a `manifest.json` naming data files (CSV,
Parquet or ORC) with a row per object: bucket, key, size, ETag and more. With `images.path` set to such a
manifest, raypose reads the data files instead of listing the bucket: the objects under
`images.inventory_prefix` that are images, keyed relative to that prefix (the keys a listing of
`s3://SOURCE-BUCKET/PREFIX/` gives, so an output can move from listing to inventory and go on), with their
size and ETag (so a replaced image is labelled again).
"""

from __future__ import annotations

import json
import posixpath
import urllib.parse
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from raypose.config.spec import ImagesSpec
from raypose.errors import SpecError
from raypose.inputs.storage import open_url

INVENTORY_MANIFEST = "manifest.json"
# CSV inventories name their columns in `fileSchema` ("Bucket, Key, Size, ..."); Parquet and ORC ones in snake case.
CSV_COLUMNS = {"Bucket": "bucket", "Key": "key", "Size": "size", "ETag": "e_tag", "IsLatest": "is_latest",
               "IsDeleteMarker": "is_delete_marker"}


def is_inventory(path: str) -> bool:
    """Whether `images.path` names an S3 Inventory manifest."""
    return posixpath.basename(path.rstrip("/")) == INVENTORY_MANIFEST


LISTING_SCHEMA = pa.schema([("image_key", pa.string()), ("image_uri", pa.string()), ("image_size", pa.int64()),
                            ("image_version", pa.string())])


def list_inventory(images: ImagesSpec) -> pa.Table:
    """(image_key, image_uri, image_size, image_version) of the inventory's current objects, unsorted."""
    tables = list(iter_inventory(images))
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


def iter_inventory(images: ImagesSpec) -> Iterator[pa.Table]:
    """`list_inventory`'s rows a data file at a time (a table per file, in the manifest's order)."""
    fs, path = open_url(images.path, images.storage_options, "images.path")
    try:
        manifest = json.loads(fs.cat_file(path))
        source, file_format = manifest["sourceBucket"], manifest["fileFormat"].lower()
        destination = manifest["destinationBucket"].rsplit(":", 1)[-1]
        files = [entry["key"] for entry in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"images.path: {images.path} is not a readable S3 Inventory manifest.json "
                        f"({type(exc).__name__}: {exc})") from exc
    if file_format not in ("csv", "parquet", "orc"):
        raise SpecError(f"images.path: {images.path}: inventory format {file_format!r} (expected CSV, Parquet or ORC)")
    protocol = images.path.split("://", 1)[0] + "://" if "://" in images.path else "s3://"
    for key in files:
        url = f"{protocol}{destination}/{key}"
        data_fs, data_path = open_url(url, images.storage_options, "images.path")
        try:
            rows = _data_file(data_fs, data_path, file_format, manifest.get("fileSchema", ""))
        except (OSError, pa.ArrowInvalid) as exc:
            raise SpecError(f"images.path: cannot read inventory file {url}: {type(exc).__name__}: {exc}") from exc
        yield _current_objects(rows, source, images.inventory_prefix or "")


def _data_file(fs, path: str, file_format: str, file_schema: str) -> pa.Table:
    """One inventory data file's rows, columns named in snake case, keys decoded."""
    with fs.open(path, "rb", compression="gzip" if path.endswith(".gz") else None) as f:
        if file_format == "csv":
            from pyarrow import csv

            names = [CSV_COLUMNS.get(name.strip(), name.strip()) for name in file_schema.split(",")]
            table = csv.read_csv(f, read_options=csv.ReadOptions(column_names=names),
                                 convert_options=csv.ConvertOptions(column_types={"key": pa.string(), "e_tag": pa.string()},
                                                                    strings_can_be_null=True))
            return table.set_column(table.schema.get_field_index("key"), "key", _url_decoded(table.column("key")))
        if file_format == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(f)
        from pyarrow import orc

        return orc.ORCFile(f).read()


def _url_decoded(keys: pa.ChunkedArray) -> pa.Array:
    """CSV inventories URL-encode their keys ("photos/a+b%2B.jpg"); decoded in Python only where one has an escape."""
    keys = keys.combine_chunks()
    encoded = pc.fill_null(pc.match_substring_regex(keys, r"[%+]"), False)
    if not pc.any(encoded).as_py():
        return keys
    decoded = [urllib.parse.unquote_plus(k) for k in keys.filter(encoded).to_pylist()]
    return pc.replace_with_mask(keys, encoded, pa.array(decoded, pa.string()))


def _current_objects(rows: pa.Table, bucket: str, prefix: str) -> pa.Table:
    """The current objects under `prefix` (not delete markers, not older versions), keyed relative to it."""
    keep = pc.starts_with(rows.column("key"), prefix) if prefix else pa.repeat(True, rows.num_rows)
    for column, wanted in (("is_latest", True), ("is_delete_marker", False)):
        if column in rows.column_names:
            values = rows.column(column)
            if not pa.types.is_boolean(values.type):
                values = pc.equal(pc.utf8_lower(values.cast(pa.string())), "true")
            keep = pc.and_(keep, pc.equal(pc.fill_null(values, wanted), wanted))
    rows = rows.filter(keep)
    keys = rows.column("key").combine_chunks()
    relative = pc.utf8_slice_codeunits(keys, len(prefix)) if prefix else keys
    size = rows.column("size").cast(pa.int64()) if "size" in rows.column_names else pa.nulls(rows.num_rows, pa.int64())
    etag = (pc.binary_join_element_wise("ETag:", rows.column("e_tag").cast(pa.string()), "")
            if "e_tag" in rows.column_names else pa.nulls(rows.num_rows, pa.string()))
    return pa.table({"image_key": relative, "image_uri": pc.binary_join_element_wise(f"s3://{bucket}/", keys, ""),
                     "image_size": size, "image_version": etag}, schema=LISTING_SCHEMA)
