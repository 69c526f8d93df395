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
from collections import Counter
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.errors import SpecError
from raypose.inputs.names import escaped
from raypose.inputs.storage import open_listed

CONTAINER_SUFFIXES = {"webdataset": (".tar",), "parquet": (".parquet", ".pq")}
BOX_FIELDS = ("bbox", "category", "score")  # inline boxes, per image: lists of equal length


def list_container_images(images: ImagesSpec, boxes: BoxesSpec | None,
                          containers: list[str]) -> tuple[pa.Table, list[dict], dict[str, int]]:
    """One row per image found in the containers (key, uri, container, offset, length [+ inline boxes]);
    error rows (image_key, image_uri, reason) for what cannot be an image; counts of what is passed over."""
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    for container in containers:
        try:
            fs, path = open_listed(container, images.storage_options)
            if images.format == "webdataset":
                rows += _tar_images(fs, path, container, images, boxes, errors, counts)
            else:
                rows += _parquet_images(fs, path, container, images, boxes, errors)
        except SpecError:
            raise
        except Exception as exc:  # a container that cannot be listed is a job-level problem
            raise SpecError(f"images.path: cannot list {container}: {type(exc).__name__}: {exc}") from exc
    table = pa.Table.from_pylist(rows) if rows else pa.table({"image_key": pa.array([], pa.string())})
    return table, errors, {name: counts[name] for name in TAR_COUNTS} if images.format == "webdataset" else {}


def read_container_bytes(task: dict, storage_options: dict[str, Any], image_column: str, cache: dict) -> bytes:
    """An image's bytes from its container (a tar byte range, or one Parquet row)."""
    container = task["container"]
    fs, path = open_listed(container, storage_options)
    if task["length"] is not None:
        return fs.cat_file(path, start=task["offset"], end=task["offset"] + task["length"])
    if container not in cache:
        cache.clear()  # one Parquet file at a time: tasks come sorted by key, mostly file by file
        with fs.open(path, "rb") as f:
            cache[container] = pq.read_table(f, columns=[image_column]).column(image_column)
    value = cache[container][task["offset"]].as_py()
    return value["bytes"] if isinstance(value, dict) else value


def read_container_image(container: str, inside: str, storage_options: dict[str, Any], image_column: str,
                         cache: dict) -> bytes:
    """The bytes of `CONTAINER#INSIDE` as an image_uri names them: a tar's member by its key (found as the
    listing finds it: the last of its name, a hard link through its target), or a Parquet file's row."""
    if not container.lower().endswith(CONTAINER_SUFFIXES["webdataset"]):
        return read_container_bytes({"container": container, "offset": int(inside), "length": None},
                                    storage_options, image_column, cache.setdefault("parquet", {}))
    members = cache.setdefault("tar", {})
    if container not in members:
        fs, path = open_listed(container, storage_options)
        with fs.open(path, "rb", block_size=1 << 16) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            members[container] = {name: (data.offset_data, data.size) for name, _, data in _tar_entries(tar)
                                  if not isinstance(data, str)}
    if inside not in members[container]:
        raise FileNotFoundError(f"no member {inside!r} in {container}")
    offset, length = members[container][inside]
    return read_container_bytes({"container": container, "offset": offset, "length": length},
                                storage_options, image_column, {})


# What a tar holds besides images, counted in the manifest: folders, and the samples' other fields
# (.json, .txt, .cls; links and special files not named as images).
TAR_COUNTS = ("tar_directories", "tar_other_members")


def _tar_images(fs, path: str, uri: str, images: ImagesSpec, boxes: BoxesSpec | None,
                errors: list[dict], counts: Counter) -> list[dict]:
    """The image members of a tar, each name once (the last member of a name, as tar extracts it).

    A hard link is read through the member it names (tar links only to earlier members); a symbolic
    link, a special file or an earlier member of the same name, named as an image, is an error row.
    """
    suffixes = tuple(s.lower() for s in images.extensions)
    inline = boxes is not None and boxes.source == "inline"
    found: dict[str, dict] = {}
    annotations = {}
    with fs.open(path, "rb", block_size=1 << 16) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for name, member, data in _tar_entries(tar):
            is_image = name.lower().endswith(suffixes)
            if isinstance(data, str):
                if is_image:
                    errors.append({"image_key": name, "image_uri": f"{uri}#{name}", "reason": data})
                else:
                    counts["tar_directories" if member.isdir() else "tar_other_members"] += 1
            elif is_image:
                if name in found:
                    errors.append({"image_key": name, "image_uri": f"{uri}#{name}", "reason": (
                        f"tar member {name!r} at byte {found[name]['offset']} is followed by another of the same "
                        "name, which is labelled instead (tar extracts the last)")})
                found[name] = {"image_key": name, "image_uri": f"{uri}#{name}", "container": uri,
                               "offset": data.offset_data, "length": data.size}
            elif inline and name.endswith(".json"):
                annotations[name[: -len(".json")]] = json.loads(tar.extractfile(data).read())
            else:
                counts["tar_other_members"] += 1
    rows = list(found.values())
    if inline:
        for row in rows:
            row.update(_inline_boxes(annotations.get(row["image_key"].rsplit(".", 1)[0]) or {}, boxes))
    return rows


def _tar_entries(tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo, tarfile.TarInfo | str]]:
    """Each member of an open tar: its name as keyed (`%XX`-escaped, normalised), the member, and the
    regular member that holds its bytes or why none does."""
    files: dict[str, tarfile.TarInfo] = {}  # regular members by name: what hard links point at
    for member in tar:
        name = posixpath.normpath(escaped(member.name))
        data = _tar_data(member, files)
        if not isinstance(data, str):
            files[name] = data
        yield name, member, data


def _tar_data(member: tarfile.TarInfo, files: dict[str, tarfile.TarInfo]) -> tarfile.TarInfo | str:
    """The regular member whose bytes `member` stands for, or why it has none."""
    if member.isfile():
        return member
    if member.islnk():
        target = files.get(posixpath.normpath(escaped(member.linkname)))
        return target if target is not None else \
            f"a hard link to {escaped(member.linkname)!r}, which is not a file earlier in the tar"
    if member.isdir():
        return "a directory member, not a file"
    if member.issym():
        return (f"a symbolic link (to {escaped(member.linkname)!r}): not followed, it may point outside the "
                "tar; pack the file itself (tar --dereference)")
    return "a special file (device or FIFO) member, not an image"


def _parquet_images(fs, path: str, uri: str, images: ImagesSpec, boxes: BoxesSpec | None,
                    errors: list[dict]) -> list[dict]:
    """The rows of a Parquet file, keyed by images.key_column, `image.path` or FILE/ROW; a null key is an error row."""
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        schema, n = parquet.schema_arrow, parquet.metadata.num_rows

        def column(name: str) -> list:
            values = parquet.read(columns=[name]).column(0).combine_chunks()
            while pa.types.is_struct(values.type):  # "image.path" comes back as {path: ...}
                values = values.field(0)
            return values.to_pylist()

        if images.image_column not in schema.names:
            raise SpecError(
                f"images.image_column: {images.image_column!r} is not a column of {uri} "
                f"(columns: {', '.join(schema.names)})"
            )
        if images.key_column:
            if images.key_column not in schema.names:
                raise SpecError(f"images.key_column: {images.key_column!r} is not a column of {uri}")
            keys = [None if k is None else str(k) for k in column(images.key_column)]
        else:
            image_type = schema.field(images.image_column).type
            has_path = pa.types.is_struct(image_type) and image_type.get_field_index("path") >= 0
            paths = column(f"{images.image_column}.path") if has_path else []
            if has_path and all(paths) and len(set(paths)) == n:
                keys = [posixpath.normpath(p) for p in paths]
            else:  # no usable name: the file's name and the row number, stable as long as the file is
                stem = posixpath.basename(uri).rsplit(".", 1)[0]
                keys = [f"{stem}/{i:08d}" for i in range(n)]
        inline = boxes is not None and boxes.source == "inline"
        if inline:
            names = (boxes.bbox_column, boxes.category_column, boxes.score_column)
            records = {field: column(name) if name in schema.names else [None] * n for field, name in zip(BOX_FIELDS, names)}
    rows = []
    for row_index, key in enumerate(keys):
        if key is None:
            errors.append({"image_key": None, "image_uri": f"{uri}#{row_index}",
                           "reason": f"images.key_column {images.key_column!r} is null in row {row_index}"})
            continue
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

