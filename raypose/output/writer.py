"""The writer: pose rows into per-shard Parquet under the output path, committed shard by shard.

Layout of an output path:

    keypoints/shard-00000.parquet  one row per instance (table.KEYPOINTS_SCHEMA)
    errors/shard-00000.parquet     one row per failed image or box (table.ERRORS_SCHEMA)
    errors/listing.parquet         boxes whose image is not in storage
    keypoint_schemas.json          keypoint names, skeleton, flip pairs per schema used
    manifest.json                  counts, durations, throughput, versions, spec (written last)
    _job.json                      what the output was made from (spec fingerprint, models, shards)
    _shards/00000.json             a shard's commit marker: its inputs' fingerprint and counts

Which images make a shard is `resume.py`'s decision (a run of sorted keys); a shard's content
does not depend on worker count or order. A shard's files are written under `_tmp/`, moved into place, and
then its marker is written: a shard without a marker is not done, and a rerun with
`output.mode: resume` redoes exactly those (same file names, so no row is written twice).
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raypose.config.spec import OutputSpec
from raypose.errors import JobFailed, SpecError
from raypose.imaging.keypoint_schemas import KeypointSchema
from raypose.inputs.storage import open_url
from raypose.schema import ERRORS_SCHEMA, KEYPOINTS_SCHEMA

KEYPOINTS_DIR = "keypoints"
ERRORS_DIR = "errors"
SHARDS_DIR = "_shards"
SCHEMAS_FILE = "keypoint_schemas.json"
MANIFEST_FILE = "manifest.json"
JOB_FILE = "_job.json"
TMP_DIR = "_tmp"
OUTPUT_ENTRIES = (KEYPOINTS_DIR, ERRORS_DIR, SHARDS_DIR, SCHEMAS_FILE, MANIFEST_FILE, JOB_FILE, TMP_DIR)
# Object stores have no folders to make, and their makedirs creates a missing bucket (s3fs,
# gcsfs, adlfs): raypose never makes one, so a missing or vanished bucket fails the job.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci"}


class OutputStore:
    """The output path: what earlier runs left there, and the small JSON files around the data."""

    def __init__(self, output: OutputSpec, storage_options: dict[str, Any]):
        self.output = output
        self.fs, self.root = open_url(output.path, storage_options, "output.path")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def makedirs(self, path: str) -> None:
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        if not protocols & OBJECT_STORES:
            self.fs.makedirs(path, exist_ok=True)

    def write_failed(self, what: str, exc: Exception) -> JobFailed:
        """A write that failed mid-job (the bucket went away, permissions changed): the job fails, naming the output."""
        return JobFailed(
            f"output.path: cannot write {what} to {self.output.path}: {type(exc).__name__}: {exc}; "
            "the job stopped (committed shards are kept: rerun with --resume when the output is writable)"
        )

    def existing_entries(self) -> list[str]:
        """The raypose entries already at the output path."""
        try:
            return [e for e in OUTPUT_ENTRIES if self.fs.exists(self.path(e))]
        except Exception as exc:  # any filesystem's failure (credentials, endpoint) ends here
            raise SpecError(f"output.path: cannot access {self.output.path}: {type(exc).__name__}: {exc}") from exc

    def check_writable(self) -> None:
        """Write and remove a probe file, so a missing bucket or a read-only path fails before Ray starts.

        Leaves nothing behind that was not there: `validate` must not change the output path.
        """
        tmp = self.path(TMP_DIR)
        try:
            had_root, had_tmp = self.fs.exists(self.root), self.fs.exists(tmp)
            self.makedirs(tmp)
            with self.fs.open(posixpath.join(tmp, ".probe"), "wb") as f:
                f.write(b"raypose")
            self.fs.rm(posixpath.join(tmp, ".probe"))
            if not had_tmp and self.fs.exists(tmp):
                self.fs.rm(tmp, recursive=True)
            if not had_root and self.fs.exists(self.root) and not self.fs.ls(self.root):
                self.fs.rm(self.root, recursive=True)
        except Exception as exc:
            raise SpecError(f"output.path: cannot write to {self.output.path}: {type(exc).__name__}: {exc}") from exc

    def read_json(self, name: str) -> Any | None:
        path = self.path(name)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def write_json(self, name: str, data: Any) -> None:
        """Write a JSON file atomically (temp file, then move)."""
        tmp = self.path(TMP_DIR, name.replace("/", "__"))
        try:
            self.makedirs(self.path(TMP_DIR))
            with self.fs.open(tmp, "wb") as f:
                f.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode())
            self.makedirs(posixpath.dirname(self.path(name)))
            self.fs.mv(tmp, self.path(name))
        except Exception as exc:
            raise self.write_failed(name, exc) from exc

    def committed_shards(self) -> dict[int, dict]:
        """Commit markers of the shards earlier runs finished."""
        folder = self.path(SHARDS_DIR)
        if not self.fs.exists(folder):
            return {}
        markers = {}
        for path in self.fs.ls(folder, detail=False):
            if path.endswith(".json"):
                marker = json.loads(self.fs.cat_file(path))
                markers[int(marker["shard"])] = marker
        return markers

    def remove_shard(self, shard: int) -> None:
        """Remove what an unfinished run may have left of a shard."""
        for path in (self.path(SHARDS_DIR, f"{shard:05d}.json"), *self.shard_files(shard)):
            if self.fs.exists(path):
                self.fs.rm(path)

    def shard_files(self, shard: int) -> tuple[str, str]:
        return (self.path(KEYPOINTS_DIR, f"shard-{shard:05d}.parquet"), self.path(ERRORS_DIR, f"shard-{shard:05d}.parquet"))

    def clear(self) -> None:
        """Remove a previous job's output (output.mode: overwrite); other files are left alone."""
        for entry in OUTPUT_ENTRIES:
            if self.fs.exists(self.path(entry)):
                self.fs.rm(self.path(entry), recursive=True)

    def finish(self, manifest: dict[str, Any]) -> None:
        """Write manifest.json last: its presence marks the output complete."""
        self.write_json(MANIFEST_FILE, manifest)
        if self.fs.exists(self.path(TMP_DIR)):  # object stores have no empty folders to remove
            self.fs.rm(self.path(TMP_DIR), recursive=True)


@dataclass(frozen=True)
class ShardInputs:
    """What a shard this run writes is made of: how many images, and their keys' fingerprint."""

    images: int
    fingerprint: str


class ShardWriter:
    """Buffers pose rows per shard and commits a shard as soon as all of its images are in."""

    def __init__(
        self,
        store: OutputStore,
        *,
        job_id: str,
        models: dict[str, tuple[str, str]],
        schemas: list[KeypointSchema],
        shards: dict[int, ShardInputs],
        on_commit: Callable[[dict], None] | None = None,
    ):
        """`on_commit(marker)` is called after each shard's commit (the job's progress reports it)."""
        self.store = store
        self.on_commit = on_commit
        self.job_id = job_id
        self.models = models  # expert -> (model id, revision)
        self.schemas = {s.name: s.describe() for s in schemas}
        metadata = {
            "raypose": json.dumps(
                {"job_id": job_id, "models": {e: {"id": m, "revision": r} for e, (m, r) in models.items()},
                 "keypoint_schemas": self.schemas}
            )
        }
        self.keypoints_schema = KEYPOINTS_SCHEMA.with_metadata(metadata)
        self.errors_schema = ERRORS_SCHEMA.with_metadata(metadata)
        self.pending_images = {shard: inputs.images for shard, inputs in shards.items()}
        self.fingerprints = {shard: inputs.fingerprint for shard, inputs in shards.items()}
        self.rows_seen: Counter[str] = Counter()
        self.crops_by_worker: Counter[str] = Counter()  # keypoint rows per pose actor ("node id:pid")
        self.images_done = self.instances = self.errors = 0  # this run's, so far
        self.buffers: dict[int, list[pa.Table]] = defaultdict(list)
        self.committed: dict[int, dict] = {}
        for shard in [s for s, n in self.pending_images.items() if n == 0]:
            self._commit(shard)

    def write(self, batch: pa.Table) -> None:
        """Take a batch of pose-stage rows; commit every shard it completes."""
        labelled = batch.filter(batch.column("keypoint_x").is_valid())
        self.instances += labelled.num_rows
        self.errors += batch.num_rows - batch.column("error_stage").null_count
        if "pose_worker" in batch.column_names:
            self.crops_by_worker.update(labelled.column("pose_worker").to_pylist())
        for shard in set(batch.column("shard").to_pylist()):
            rows = batch.filter(pc.equal(batch.column("shard"), shard))
            self.buffers[shard].append(rows)
            for key, expected in zip(rows.column("image_key").to_pylist(), rows.column("image_rows").to_pylist()):
                self.rows_seen[key] += 1
                if self.rows_seen[key] == expected:
                    del self.rows_seen[key]
                    self.pending_images[shard] -= 1
                    self.images_done += 1
            if self.pending_images[shard] == 0:
                self._commit(shard)

    def write_listing_errors(self, errors: pa.Table) -> None:
        """Errors found while listing (boxes for images not in storage): one file, rewritten each run."""
        # Written even when empty, so errors/ always holds a file with the schema for readers.
        self._write_parquet(self._errors(errors), self.store.path(ERRORS_DIR, "listing.parquet"), self.errors_schema)

    def close(self) -> dict[str, Any]:
        """Check every shard was committed; write the schema sidecar; return this run's counts."""
        unfinished = sorted(s for s, n in self.pending_images.items() if n > 0)
        if unfinished:
            raise RuntimeError(f"the pipeline ended with shards not complete: {unfinished[:10]}")
        self.store.write_json(SCHEMAS_FILE, self.schemas)
        return self.committed

    def _commit(self, shard: int) -> None:
        rows = pa.concat_tables(self.buffers.pop(shard, [])) if shard in self.buffers else None
        instances = errors = None
        if rows is not None and rows.num_rows:
            failed = rows.column("error_stage").is_valid()
            has_pose = rows.column("keypoint_x").is_valid()
            instances = self._instances(rows.filter(has_pose))
            errors = self._errors(
                rows.filter(failed)
                .select(["image_key", "image_uri", "instance_index", "error_stage", "error_reason"])
                .rename_columns(["image_key", "image_uri", "instance_index", "stage", "reason"])
            )
        keypoints_path, errors_path = self.store.shard_files(shard)
        # Every shard has a keypoints file (maybe empty: readers always find the schema); an
        # errors file only when it has errors.
        self._write_parquet(instances if instances is not None else self.keypoints_schema.empty_table(),
                            keypoints_path, self.keypoints_schema)
        files = [keypoints_path]
        if errors is not None and errors.num_rows:
            self._write_parquet(errors, errors_path, self.errors_schema)
            files.append(errors_path)
        marker = {
            "shard": shard,
            "job_id": self.job_id,
            "inputs": self.fingerprints[shard],
            "images": 0 if rows is None else len(set(rows.column("image_key").to_pylist())),
            "instances": 0 if instances is None else instances.num_rows,
            "errors": 0 if errors is None else errors.num_rows,
            "errors_by_stage": dict(Counter(errors.column("stage").to_pylist())) if errors is not None else {},
            "images_without_boxes": 0 if rows is None else _count_empty(rows),
            "files": files,
        }
        self.store.write_json(posixpath.join(SHARDS_DIR, f"{shard:05d}.json"), marker)
        self.committed[shard] = marker
        if self.on_commit is not None:
            self.on_commit(marker)

    def _instances(self, rows: pa.Table) -> pa.Table:
        experts = rows.column("expert").to_pylist()
        run = {
            "job_id": [self.job_id] * len(experts),
            "model_id": [self.models[e][0] for e in experts],
            "model_revision": [self.models[e][1] for e in experts],
        }
        columns = {
            name: pa.array(run[name], pa.string()) if name in run else rows.column(name)
            for name in KEYPOINTS_SCHEMA.names
        }
        return pa.table(columns, schema=self.keypoints_schema)

    def _errors(self, errors: pa.Table) -> pa.Table:
        columns = {
            name: pa.array([self.job_id] * errors.num_rows, pa.string()) if name == "job_id" else errors.column(name)
            for name in ERRORS_SCHEMA.names
        }
        return pa.table(columns, schema=self.errors_schema)

    def _write_parquet(self, table: pa.Table, path: str, schema: pa.Schema) -> None:
        output = self.store.output
        tmp = self.store.path(TMP_DIR, posixpath.basename(posixpath.dirname(path)) + "-" + posixpath.basename(path))
        compression = None if output.compression == "none" else output.compression
        try:
            self.store.makedirs(self.store.path(TMP_DIR))
            self.store.makedirs(posixpath.dirname(path))
            with self.store.fs.open(tmp, "wb") as f:
                pq.write_table(table.cast(schema), f, row_group_size=output.row_group_size, compression=compression)
            self.store.fs.mv(tmp, path)
        except Exception as exc:
            raise self.store.write_failed(posixpath.relpath(path, self.store.root), exc) from exc


def _count_empty(rows: pa.Table) -> int:
    """Images that reached the writer with nothing to label (e.g. nothing detected)."""
    empty = pc.and_(pc.invert(rows.column("error_stage").is_valid()), pc.invert(rows.column("keypoint_x").is_valid()))
    return pc.sum(empty.cast(pa.int64())).as_py() or 0
