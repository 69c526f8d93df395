"""Ray Datasets over a job's output, for outputs larger than one machine's memory (`read_keypoints(dataset=True)`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.data import Dataset


def keypoints_dataset(fs: Any, files: list[str], columns: list[str] | None = None, filter: Any = None) -> Dataset:
    """A lazy Ray Dataset over an output's keypoints Parquet files (`fs`, an fsspec filesystem; empty when none)."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from raypose.schema import KEYPOINTS_SCHEMA

    if not files:
        empty = KEYPOINTS_SCHEMA.empty_table()
        return ray.data.from_arrow(empty.select(columns) if columns else empty)
    options = {"filter": filter} if filter is not None else {}
    return ray.data.read_parquet(files, filesystem=PyFileSystem(FSSpecHandler(fs)), columns=columns, **options)
