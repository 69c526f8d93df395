"""Images inside containers: WebDataset tar shards and Parquet files with an image-bytes column.

Listing happens on the driver and reads no image bytes: tar headers only (members are
skipped by seeking), and only the key and box columns of Parquet files. Each image then
gets a task with its container, and where its bytes are (a tar member's offset and length,
or a Parquet row), so the crop stage reads exactly that image and nothing else.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.errors import SpecError
from raypose.inputs.storage import uri_of, with_retries

CONTAINER_SUFFIXES = {"webdataset": (".tar",), "parquet": (".parquet", ".pq")}
BOX_FIELDS = ("bbox", "category", "score")  # inline boxes, per image: lists of equal length


def list_container_images(images: ImagesSpec, boxes: BoxesSpec | None, containers: list[str]) -> pa.Table:
    """One row per image found in the containers: key, uri, container, offset, length [+ inline boxes]."""
    fs, _ = url_to_fs(containers[0], **with_retries(containers[0], images.storage_options))
    rows: list[dict[str, Any]] = []
    for container in containers:
        try:
            if images.format == "webdataset":
                rows += _tar_images(fs, container, images, boxes)
            else:
                rows += _parquet_images(fs, container, images, boxes)
        except SpecError:
            raise
        except Exception as exc:  # a container that cannot be listed is a job-level problem
            raise SpecError(f"images.path: cannot list {container}: {type(exc).__name__}: {exc}") from exc
    return pa.Table.from_pylist(rows) if rows else pa.table({"image_key": pa.array([], pa.string())})


def read_container_bytes(task: dict, storage_options: dict[str, Any], image_column: str, cache: dict) -> bytes:
    """An image's bytes from its container (a tar byte range, or one Parquet row)."""
    container = task["container"]
    fs, path = url_to_fs(container, **with_retries(container, storage_options))
    if task["length"] is not None:
        return fs.cat_file(path, start=task["offset"], end=task["offset"] + task["length"])
    if container not in cache:
        cache.clear()  # one Parquet file at a time: tasks come sorted by key, mostly file by file
        with fs.open(path, "rb") as f:
            cache[container] = pq.read_table(f, columns=[image_column]).column(image_column)
    value = cache[container][task["offset"]].as_py()
    return value["bytes"] if isinstance(value, dict) else value


def _tar_images(fs, container: str, images: ImagesSpec, boxes: BoxesSpec | None) -> list[dict]:
    suffixes = tuple(s.lower() for s in images.extensions)
    found, annotations = {}, {}
    with fs.open(container, "rb", block_size=1 << 16) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = posixpath.normpath(member.name)
            stem = name.rsplit(".", 1)[0]
            if name.lower().endswith(suffixes):
                found[stem] = {"image_key": name, "image_uri": f"{uri_of(fs, container)}#{name}",
                               "container": uri_of(fs, container), "offset": member.offset_data, "length": member.size}
            elif boxes is not None and boxes.source == "inline" and name.endswith(".json"):
                annotations[stem] = json.loads(tar.extractfile(member).read())
    rows = []
    for stem, row in found.items():
        if boxes is not None and boxes.source == "inline":
            row.update(_inline_boxes(annotations.get(stem) or {}, boxes))
        rows.append(row)
    return rows


def _parquet_images(fs, container: str, images: ImagesSpec, boxes: BoxesSpec | None) -> list[dict]:
    with fs.open(container, "rb") as f:
        parquet = pq.ParquetFile(f)
        schema, n = parquet.schema_arrow, parquet.metadata.num_rows

        def column(name: str) -> list:
            values = parquet.read(columns=[name]).column(0).combine_chunks()
            while pa.types.is_struct(values.type):  # "image.path" comes back as {path: ...}
                values = values.field(0)
            return values.to_pylist()

        if images.image_column not in schema.names:
            raise SpecError(
                f"images.image_column: {images.image_column!r} is not a column of {container} "
                f"(columns: {', '.join(schema.names)})"
            )
        if images.key_column:
            if images.key_column not in schema.names:
                raise SpecError(f"images.key_column: {images.key_column!r} is not a column of {container}")
            keys = [str(k) for k in column(images.key_column)]
        else:
            image_type = schema.field(images.image_column).type
            has_path = pa.types.is_struct(image_type) and image_type.get_field_index("path") >= 0
            paths = column(f"{images.image_column}.path") if has_path else []
            if has_path and all(paths) and len(set(paths)) == n:
                keys = [posixpath.normpath(p) for p in paths]
            else:  # no usable name: the file's name and the row number, stable as long as the file is
                stem = posixpath.basename(container).rsplit(".", 1)[0]
                keys = [f"{stem}/{i:08d}" for i in range(n)]
        inline = boxes is not None and boxes.source == "inline"
        if inline:
            names = (boxes.bbox_column, boxes.category_column, boxes.score_column)
            records = {field: column(name) if name in schema.names else [None] * n for field, name in zip(BOX_FIELDS, names)}
    uri = uri_of(fs, container)
    rows = []
    for row_index, key in enumerate(keys):
        row = {"image_key": key, "image_uri": f"{uri}#{row_index}", "container": uri, "offset": row_index, "length": None}
        if inline:
            row.update(_inline_boxes({field: values[row_index] for field, values in records.items()}, boxes, named=False))
        rows.append(row)
    return rows


def _inline_boxes(record: dict, boxes: BoxesSpec, named: bool = True) -> dict:
    """A sample's own boxes (WebDataset .json member or Parquet columns) as per-image lists."""
    if named:
        record = {field: record.get(column) for field, column in
                  zip(BOX_FIELDS, (boxes.bbox_column, boxes.category_column, boxes.score_column))}
    bbox = record.get("bbox") or []
    n = len(bbox)
    category = record.get("category") or [None] * n
    score = record.get("score") or [None] * n
    return {"bbox": bbox, "category": category if len(category) == n else [None] * n,
            "score": score if len(score) == n else [None] * n}

