"""Ray Datasets over a job's output, for outputs larger than one machine's memory (`read_keypoints(dataset=True)`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.data import Dataset

    from raypose.review.reading import JobOutput


def keypoints_dataset(output: JobOutput, columns: list[str] | None = None, filter: Any = None) -> Dataset:
    """A lazy Ray Dataset over an output's keypoints Parquet files (empty when there are none)."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from raypose.schema import KEYPOINTS_SCHEMA

    files = output.parquet_files()  # the listing only: Ray reads the files' footers itself
    if not files:
        empty = KEYPOINTS_SCHEMA.empty_table()
        return ray.data.from_arrow(empty.select(columns) if columns else empty)
    options = {"filter": filter} if filter is not None else {}
    return ray.data.read_parquet(files, filesystem=PyFileSystem(FSSpecHandler(output.fs)), columns=columns,
                                 **options)
