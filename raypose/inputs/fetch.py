"""Fetching an image's bytes: a file of its own, a tar member's byte range, or a Parquet row."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from raypose.errors import ImageError
from raypose.inputs.storage import open_listed


def read_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    """Read one listed object's bytes (its URI taken literally); missing or unreadable objects raise ImageError."""
    try:
        fs, path = open_listed(uri, storage_options)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ImageError("not found in storage", stage="read") from exc
    except Exception as exc:  # any storage failure (network, permissions) is this image's error
        raise ImageError(f"cannot read: {type(exc).__name__}: {exc}", stage="read") from exc


def read_image(uri: str, storage_options: dict[str, Any], image_column: str = "image",
               cache: dict | None = None) -> bytes:
    """The bytes of the image an output row's `image_uri` names, read as the job read them: a file of its own,
    a WebDataset member (`SHARD.tar#MEMBER`) or a row of a Parquet file's `image_column` (`FILE.parquet#ROW`).

    `cache` keeps what a container's next image needs (a tar's member index, a Parquet file's column)
    across calls. Failures raise ImageError (stage `read`).
    """
    from raypose.inputs.containers import CONTAINER_SUFFIXES, read_container_image

    container, sep, inside = uri.rpartition("#")
    lower = container.lower()
    in_tar = lower.endswith(CONTAINER_SUFFIXES["webdataset"])
    if not sep or not (in_tar or (lower.endswith(CONTAINER_SUFFIXES["parquet"]) and inside.isdigit())):
        return read_bytes(uri, storage_options)
    try:
        return read_container_image(container, inside, storage_options, image_column, {} if cache is None else cache)
    except FileNotFoundError as exc:
        try:  # a file of its own whose name holds "x.tar#": a path that exists is a path
            return read_bytes(uri, storage_options)
        except ImageError:
            raise ImageError(f"not found in storage: {exc}", stage="read") from exc
    except Exception as exc:  # a broken container, a row past its end
        raise ImageError(f"cannot read from {container}: {type(exc).__name__}: {exc}", stage="read") from exc


def read_task_bytes(task: dict, storage_options: dict[str, Any], image_column: str, containers: dict) -> bytes:
    """An image task's bytes: already read by the detector, inside a container, or a file of its own.

    `containers` caches the Parquet file being read across calls (one batch's images).
    """
    if task.get("image_bytes"):
        return task["image_bytes"]
    if task.get("container"):
        from raypose.inputs.containers import read_container_bytes

        try:
            return read_container_bytes(task, storage_options, image_column, containers)
        except Exception as exc:  # a broken container costs its images, not the batch
            raise ImageError(f"cannot read from {task['container']}: {type(exc).__name__}: {exc}", stage="read") from exc
    return read_bytes(task["image_uri"], storage_options)


def read_images(batch: pa.Table, *, storage_options: dict[str, Any], image_column: str = "image") -> pa.Table:
    """Image tasks -> the same rows with `image_bytes` read; a failed read becomes the row's error.

    The CPU stage when the pose device decodes and crops (resources.crop_in: pose_device).
    """
    tasks = batch.to_pylist()
    containers: dict = {}
    for task in tasks:
        data = read_cropped_image(task, storage_options, image_column, containers)
        if isinstance(data, ImageError):
            task["error_stage"], task["error_reason"] = data.stage, str(data)
        elif data is not None:
            task["image_bytes"] = data
    return pa.Table.from_pylist(tasks, schema=batch.schema)


def read_cropped_image(task: dict, storage_options: dict[str, Any], image_column: str,
                       containers: dict) -> bytes | pa.Buffer | ImageError | None:
    """The bytes of an image the crop step will cut, the ImageError reading them raised, or None
    when there is nothing to cut (an earlier stage's failure, no boxes): the crop step records it as it is."""
    if task.get("error_stage") or not task["box_xywh"]:
        return None
    try:
        return read_task_bytes(task, storage_options, image_column, containers)
    except ImageError as exc:
        return exc
