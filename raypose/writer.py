"""The writer: keypoint rows and error rows into Parquet under the output path, plus sidecars.

Layout of an output path:

    keypoints/part-00000.parquet   one row per instance (table.KEYPOINTS_SCHEMA)
    errors/part-00000.parquet      one row per failed image or box (table.ERRORS_SCHEMA)
    keypoint_schemas.json          keypoint names, skeleton, flip pairs per schema used
    manifest.json                  counts, durations, throughput, versions, spec

Files are written under `_tmp/` and moved into place when complete, so a reader never
sees a half-written Parquet file.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from raypose.errors import SpecError
from raypose.keypoint_schemas import KeypointSchema
from raypose.spec import OutputSpec
from raypose.table import ERRORS_SCHEMA, KEYPOINTS_SCHEMA

KEYPOINTS_DIR = "keypoints"
ERRORS_DIR = "errors"
SCHEMAS_FILE = "keypoint_schemas.json"
MANIFEST_FILE = "manifest.json"
TMP_DIR = "_tmp"
OUTPUT_ENTRIES = (KEYPOINTS_DIR, ERRORS_DIR, SCHEMAS_FILE, MANIFEST_FILE, TMP_DIR)


def check_output(output: OutputSpec, storage_options: dict[str, Any]) -> None:
    """Refuse (before any work) to mix a new job into existing output unless mode says so."""
    try:
        fs, root = url_to_fs(output.path, **storage_options)
        existing = [e for e in OUTPUT_ENTRIES if fs.exists(posixpath.join(root, e))]
    except Exception as exc:  # any filesystem's failure (credentials, endpoint) ends here
        raise SpecError(f"output.path: cannot access {output.path}: {type(exc).__name__}: {exc}") from exc
    if existing and output.mode == "error":
        raise SpecError(
            f"output.path: {output.path} already holds raypose output ({', '.join(existing)}); "
            "set output.mode: overwrite to replace it, or choose another path"
        )


def clear_output(output: OutputSpec, storage_options: dict[str, Any]) -> None:
    """Remove a previous job's output (output.mode: overwrite); other files are left alone."""
    fs, root = url_to_fs(output.path, **storage_options)
    for entry in OUTPUT_ENTRIES:
        path = posixpath.join(root, entry)
        if fs.exists(path):
            fs.rm(path, recursive=True)


class OutputWriter:
    """Streams batches of pose rows into rolling Parquet files: keypoints and errors apart."""

    def __init__(
        self,
        output: OutputSpec,
        storage_options: dict[str, Any],
        *,
        job_id: str,
        models: dict[str, tuple[str, str]],
        schemas: list[KeypointSchema],
    ):
        self.output = output
        self.fs, self.root = url_to_fs(output.path, **storage_options)
        self.job_id = job_id
        self.models = models  # expert -> (model id, revision)
        self.schemas = {s.name: s.describe() for s in schemas}
        self.image_keys: set[str] = set()
        metadata = {
            "raypose": json.dumps(
                {"job_id": job_id, "models": {e: {"id": m, "revision": r} for e, (m, r) in models.items()},
                 "keypoint_schemas": self.schemas}
            )
        }
        self.fs.makedirs(posixpath.join(self.root, TMP_DIR), exist_ok=True)
        self.keypoints = _RollingParquet(self, KEYPOINTS_DIR, KEYPOINTS_SCHEMA.with_metadata(metadata))
        self.errors = _RollingParquet(self, ERRORS_DIR, ERRORS_SCHEMA.with_metadata(metadata))
        self.errors_by_stage: Counter[str] = Counter()

    def write(self, batch: pa.Table) -> None:
        """Route one batch of pose-stage rows: instances to keypoints, failures to errors."""
        self.image_keys.update(batch.column("image_key").to_pylist())
        failed = batch.column("error_stage").is_valid()
        instances = batch.filter(pc.invert(failed))
        if instances.num_rows:
            experts = instances.column("expert").to_pylist()
            run = {
                "job_id": [self.job_id] * len(experts),
                "model_id": [self.models[e][0] for e in experts],
                "model_revision": [self.models[e][1] for e in experts],
            }
            columns = {
                name: pa.array(run[name], pa.string()) if name in run else instances.column(name)
                for name in KEYPOINTS_SCHEMA.names
            }
            self.keypoints.append(pa.table(columns, schema=self.keypoints.schema))
        failures = batch.filter(failed)
        if failures.num_rows:
            self.write_errors(
                failures.select(["image_key", "image_uri", "instance_index", "error_stage", "error_reason"])
                .rename_columns(["image_key", "image_uri", "instance_index", "stage", "reason"])
            )

    def write_errors(self, errors: pa.Table) -> None:
        """Append error rows (image_key, image_uri, instance_index, stage, reason)."""
        n = errors.num_rows
        if not n:
            return
        columns = {
            name: pa.array([self.job_id] * n, pa.string()) if name == "job_id" else errors.column(name)
            for name in ERRORS_SCHEMA.names
        }
        table = pa.table(columns, schema=self.errors.schema)
        self.errors_by_stage.update(table.column("stage").to_pylist())
        self.errors.append(table)

    def close(self) -> dict[str, Any]:
        """Finish all files, write the schema sidecar; return what was written."""
        keypoint_files = self.keypoints.close()
        error_files = self.errors.close()
        self._commit(SCHEMAS_FILE, self.schemas)
        return {
            "instances": self.keypoints.rows,
            "errors": self.errors.rows,
            "errors_by_stage": dict(self.errors_by_stage),
            "image_keys": self.image_keys,
            "keypoint_files": keypoint_files,
            "error_files": error_files,
        }

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write manifest.json last: its presence marks the output complete."""
        self._commit(MANIFEST_FILE, manifest)
        tmp = posixpath.join(self.root, TMP_DIR)
        if self.fs.exists(tmp):  # object stores have no empty folders to remove
            self.fs.rm(tmp, recursive=True)

    def _commit(self, name: str, data: Any) -> None:
        tmp = posixpath.join(self.root, TMP_DIR, name)
        with self.fs.open(tmp, "wb") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode())
        self.fs.mv(tmp, posixpath.join(self.root, name))


class _RollingParquet:
    """Parquet files of at most `rows_per_file` rows, in row groups of `row_group_size`."""

    def __init__(self, owner: OutputWriter, folder: str, schema: pa.Schema):
        self.owner = owner
        self.folder = folder
        self.schema = schema
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0
        self.files: list[str] = []
        self._file = None
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        owner.fs.makedirs(posixpath.join(owner.root, folder), exist_ok=True)

    def append(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.owner.output.row_group_size:
            self._flush(self.owner.output.row_group_size)

    def close(self) -> list[str]:
        self._flush(0)
        if not self.files and self._writer is None:
            self._open()  # an empty table still carries the schema for readers
        self._finish_file()
        return self.files

    def _flush(self, at_least: int) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending, self.pending_rows = [], 0
        output = self.owner.output
        start = 0
        while table.num_rows - start >= max(at_least, 1):
            if self._writer is None:
                self._open()
            room = output.rows_per_file - self._file_rows
            take = min(room, output.row_group_size, table.num_rows - start)
            self._writer.write_table(table.slice(start, take), row_group_size=output.row_group_size)
            self._file_rows += take
            start += take
            if self._file_rows >= output.rows_per_file:
                self._finish_file()
        if start < table.num_rows:
            rest = table.slice(start)
            self.pending, self.pending_rows = [rest], rest.num_rows

    def _open(self) -> None:
        owner = self.owner
        name = f"part-{len(self.files):05d}.parquet"
        self._tmp = posixpath.join(owner.root, TMP_DIR, f"{self.folder}-{name}")
        self._final = posixpath.join(owner.root, self.folder, name)
        self._file = owner.fs.open(self._tmp, "wb")
        compression = None if owner.output.compression == "none" else owner.output.compression
        self._writer = pq.ParquetWriter(self._file, self.schema, compression=compression)
        self._file_rows = 0

    def _finish_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        self.owner.fs.mv(self._tmp, self._final)
        self.files.append(self._final)
        self._writer = self._file = None
