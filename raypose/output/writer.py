"""The writer: pose rows into per-shard Parquet under the output path, committed shard by shard.

Layout of an output path:

    keypoints/shard-00000-<part>.parquet  one row per instance (schema.KEYPOINTS_SCHEMA), parts of shard 0
    errors/shard-00000-<part>.parquet     one row per failed image or box (schema.ERRORS_SCHEMA)
    errors/listing.parquet         boxes whose image is not in storage
    keypoint_schemas.json          keypoint names, skeleton, flip pairs per schema used
    manifest.json                  counts, durations, throughput, versions, spec (written last)
    _job.json                      what the output was made from (spec fingerprint, models, shards)
    _shards/00000.json             a shard's commit marker: its inputs' fingerprint and counts

Which images make a shard is `resume.py`'s decision (a run of sorted keys); a shard's content
does not depend on worker count or order. The workers write a shard's rows as part files
(`write_parts`, a Ray task after the pose stage) under `_tmp/parts/`; the driver only counts
(`ShardWriter.take`), and once all of a shard's images are in it moves the parts into place and
writes the marker: a shard without a marker is not done, and a rerun with `output.mode: resume`
redoes exactly those (their leftovers removed first; a part's name is a hash of its rows, so a
retried task writes the same file and no row is written twice).
"""

from __future__ import annotations

import hashlib
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
from raypose.inputs.storage import open_url
from raypose.schema import ERRORS_SCHEMA, KEYPOINTS_SCHEMA

KEYPOINTS_DIR = "keypoints"
ERRORS_DIR = "errors"
SHARDS_DIR = "_shards"
SCHEMAS_FILE = "keypoint_schemas.json"
MANIFEST_FILE = "manifest.json"
JOB_FILE = "_job.json"
TMP_DIR = "_tmp"
PLAN_DIR = "_plan"
OUTPUT_ENTRIES = (KEYPOINTS_DIR, ERRORS_DIR, SHARDS_DIR, PLAN_DIR, SCHEMAS_FILE, MANIFEST_FILE, JOB_FILE, TMP_DIR)
# What overwrite may remove: raypose's own names (names starting with `_` are raypose's).
OWN_FILES = (f"{KEYPOINTS_DIR}/shard-[0-9][0-9][0-9][0-9][0-9]*.parquet",
             f"{ERRORS_DIR}/shard-[0-9][0-9][0-9][0-9][0-9]*.parquet", f"{ERRORS_DIR}/listing.parquet",
             f"{SHARDS_DIR}/[0-9][0-9][0-9][0-9][0-9]*.json", f"{PLAN_DIR}/[0-9][0-9][0-9][0-9][0-9]*.parquet",
             TMP_DIR, SCHEMAS_FILE, MANIFEST_FILE, JOB_FILE)
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

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file of the output (a full path, as `path()` gives it), whole or some of its columns."""
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def write_parquet(self, table: pa.Table, path: str, schema: pa.Schema) -> None:
        """Write one Parquet file whole: into `_tmp/` first, then moved to `path`."""
        output = self.output
        tmp = self.path(TMP_DIR, hashlib.sha1(path.encode()).hexdigest()[:16] + ".parquet.part")
        compression = None if output.compression == "none" else output.compression
        try:
            self.makedirs(self.path(TMP_DIR))
            self.makedirs(posixpath.dirname(path))
            with self.fs.open(tmp, "wb") as f:
                pq.write_table(table.cast(schema), f, row_group_size=output.row_group_size, compression=compression)
            self.fs.mv(tmp, path)
        except Exception as exc:
            raise self.write_failed(posixpath.relpath(path, self.root), exc) from exc

    def move(self, source: str, target: str) -> None:
        """Move a finished file into place (a part into its table's folder when its shard commits)."""
        try:
            self.makedirs(posixpath.dirname(target))
            self.fs.mv(source, target)
        except Exception as exc:
            raise self.write_failed(posixpath.relpath(target, self.root), exc) from exc

    def clear(self) -> list[str]:
        """Remove what raypose wrote here (output.mode: overwrite), and nothing else; the paths it removed.

        Only files with raypose's own names (`OWN_FILES`) go, manifest.json and keypoint_schemas.json
        only when raypose wrote them: a user's `keypoints/notes.csv` or their own `manifest.json` stays.
        """
        removed = []
        for pattern in OWN_FILES:
            for path in sorted(self.fs.glob(self.path(pattern))):
                if posixpath.basename(path) in (MANIFEST_FILE, SCHEMAS_FILE) and not self._written_by_raypose(path):
                    continue
                self.fs.rm(path, recursive=True)
                removed.append(path)
        for folder in (KEYPOINTS_DIR, ERRORS_DIR, SHARDS_DIR, PLAN_DIR):  # folders raypose made, once empty
            path = self.path(folder)
            if self.fs.isdir(path) and not self.fs.ls(path, detail=False):
                self.fs.rm(path, recursive=True)
        return removed

    def foreign_files(self) -> list[str]:
        """Files at the output path with the names raypose writes there that raypose did not write (a user's own
        manifest.json): overwriting them would lose them."""
        return [name for name in (MANIFEST_FILE, SCHEMAS_FILE)
                if self.fs.exists(self.path(name)) and not self._written_by_raypose(self.path(name))]

    def _written_by_raypose(self, path: str) -> bool:
        try:
            data = json.loads(self.fs.cat_file(path))
        except (ValueError, OSError):
            return False
        if not isinstance(data, dict):
            return False
        if posixpath.basename(path) == SCHEMAS_FILE:  # schema name -> its description (schema.describe)
            return bool(data) and all(isinstance(v, dict) and {"keypoints", "skeleton"} <= set(v) for v in data.values())
        return "raypose" in (data.get("versions") or {}) or "result_key" in data

    def finish(self, manifest: dict[str, Any]) -> None:
        """Write manifest.json last: its presence marks the output complete."""
        self.write_json(MANIFEST_FILE, manifest)
        if self.fs.exists(self.path(TMP_DIR)):  # object stores have no empty folders to remove
            self.fs.rm(self.path(TMP_DIR), recursive=True)


@dataclass(frozen=True)
class ShardInputs:
    """What a shard this run writes is made of: how many images, their fingerprint, its key range and plan file."""

    images: int
    fingerprint: str
    first_key: str | None = None
    last_key: str | None = None
    plan: str | None = None  # _plan/NNNNN.parquet: the shard's image tasks, and once committed its index


@dataclass(frozen=True)
class PartTarget:
    """Where the workers write parts, and what every row and file carries: all a write task needs."""

    output: OutputSpec
    storage_options: dict[str, Any]
    job_id: str
    models: dict[str, tuple[str, str]]  # expert -> (model id, revision)
    schemas: dict[str, dict]  # keypoint schema name -> its description

    def metadata(self) -> dict[str, str]:
        """The Parquet schema metadata of every file: the job, the models, the keypoint schemas."""
        return {"raypose": json.dumps({
            "job_id": self.job_id, "models": {e: {"id": m, "revision": r} for e, (m, r) in self.models.items()},
            "keypoint_schemas": self.schemas})}


def write_parts(batch: pa.Table, *, target: PartTarget) -> pa.Table:
    """Worker side: a batch of pose rows -> its keypoints and errors as part files of their shards
    (under `_tmp/parts/`, moved into place when the shard commits), and one summary row per shard
    (`PART_SUMMARY_SCHEMA`), which is all that reaches the driver.

    A part's name is a hash of its rows' keys, so a retried task writes the same file again.
    """
    store = OutputStore(target.output, target.storage_options)
    keypoints_schema = KEYPOINTS_SCHEMA.with_metadata(target.metadata())
    errors_schema = ERRORS_SCHEMA.with_metadata(target.metadata())
    summaries = []
    shards = batch.column("shard")
    for shard in pc.unique(shards).to_pylist():
        rows = batch.filter(pc.equal(shards, shard))
        labelled = rows.filter(rows.column("keypoint_x").is_valid())
        failed = rows.filter(rows.column("error_stage").is_valid())
        name = f"shard-{shard:05d}-{_digest(rows)}.parquet"
        files = []
        for folder, table, schema in ((KEYPOINTS_DIR, _instances(labelled, target), keypoints_schema),
                                      (ERRORS_DIR, _errors_of(failed, target.job_id), errors_schema)):
            if table.num_rows:
                store.write_parquet(table, store.path(TMP_DIR, PARTS_DIR, folder, name), schema)
                files.append(posixpath.join(folder, name))
        per_image = rows.group_by("image_key", use_threads=False).aggregate([("image_rows", "max"), ("image_rows", "count")])
        workers = Counter(labelled.column("pose_worker").to_pylist()) if "pose_worker" in rows.column_names else {}
        summaries.append({
            "shard": shard, "files": files, "images": per_image.column("image_key").to_pylist(),
            "image_rows": per_image.column("image_rows_max").to_pylist(),
            "rows": per_image.column("image_rows_count").to_pylist(), "instances": labelled.num_rows,
            "errors": failed.num_rows, "errors_by_stage": json.dumps(Counter(failed.column("error_stage").to_pylist())),
            "empty": _count_empty(rows), "workers": json.dumps(workers),
        })
    return pa.Table.from_pylist(summaries, schema=PART_SUMMARY_SCHEMA)


# What a write task tells the driver, per shard of its batch: its part files (relative to the
# output), the images it saw with their row counts (an image is done when all its rows are in),
# and the counts the commit marker adds up.
PART_SUMMARY_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("files", pa.list_(pa.string())), ("images", pa.list_(pa.string())),
    ("image_rows", pa.list_(pa.int32())), ("rows", pa.list_(pa.int64())), ("instances", pa.int64()),
    ("errors", pa.int64()), ("errors_by_stage", pa.string()), ("empty", pa.int64()), ("workers", pa.string()),
])
PARTS_DIR = "parts"


class ShardWriter:
    """The driver's side: takes the write tasks' summaries and commits a shard as soon as all of its
    images are in (its parts moved into place, then its marker written)."""

    def __init__(
        self,
        store: OutputStore,
        target: PartTarget,
        *,
        shards: dict[int, ShardInputs],
        on_commit: Callable[[dict], None] | None = None,
        before_commit: Callable[[], None] | None = None,
        finish_parts: Callable[[OutputStore, list[str]], None] | None = None,
    ):
        """`on_commit(marker)` is called after each shard's commit (the job's progress reports it);
        `before_commit()` before each, to stop a run that lost its output's lease."""
        self.store = store
        self.target = target
        self.on_commit = on_commit
        self.before_commit = before_commit
        self.finish_parts = finish_parts  # a complete shard's keypoint parts rewritten before they move (tracks.py)
        self.errors_schema = ERRORS_SCHEMA.with_metadata(target.metadata())
        self.keypoints_schema = KEYPOINTS_SCHEMA.with_metadata(target.metadata())
        self.pending_images = {shard: inputs.images for shard, inputs in shards.items()}
        self.inputs = dict(shards)
        self.rows_seen: Counter[str] = Counter()
        self.crops_by_worker: Counter[str] = Counter()  # keypoint rows per pose actor ("node id:pid")
        self.images_done = self.instances = self.errors = 0  # this run's, so far
        self.parts: dict[int, list[dict]] = defaultdict(list)
        self.committed: dict[int, dict] = {}
        for shard in [s for s, n in self.pending_images.items() if n == 0]:
            self._commit(shard)

    def write(self, batch: pa.Table) -> None:
        """Write a batch of pose rows here, in this process (as a write task would), and take its summary."""
        self.take(write_parts(batch, target=self.target))

    def take(self, summaries: pa.Table) -> None:
        """Take write tasks' summaries; commit every shard they complete."""
        for summary in summaries.to_pylist():
            shard = summary["shard"]
            self.parts[shard].append(summary)
            self.instances += summary["instances"]
            self.errors += summary["errors"]
            self.crops_by_worker.update(json.loads(summary["workers"]))
            for key, expected, rows in zip(summary["images"], summary["image_rows"], summary["rows"]):
                self.rows_seen[key] += rows
                if self.rows_seen[key] >= expected:
                    del self.rows_seen[key]
                    self.pending_images[shard] -= 1
                    self.images_done += 1
            if self.pending_images[shard] == 0:
                self._commit(shard)

    def write_listing_errors(self, errors: pa.Table) -> None:
        """Errors found while listing (boxes for images not in storage): one file, rewritten each run."""
        # Written even when empty, so errors/ always holds a file with the schema for readers.
        errors = errors.set_column(0, "job_id", pa.array([self.target.job_id] * errors.num_rows, pa.string()))
        self.store.write_parquet(errors, self.store.path(ERRORS_DIR, "listing.parquet"), self.errors_schema)

    def close(self) -> dict[str, Any]:
        """Check every shard was committed; write the schema sidecar; return this run's commit markers."""
        unfinished = sorted(s for s, n in self.pending_images.items() if n > 0)
        if unfinished:
            raise RuntimeError(f"the pipeline ended with shards not complete: {unfinished[:10]}")
        self.store.write_json(SCHEMAS_FILE, self.target.schemas)
        return self.committed

    def _commit(self, shard: int) -> None:
        if self.before_commit is not None:
            self.before_commit()
        parts = self.parts.pop(shard, [])
        relatives = sorted({f for part in parts for f in part["files"]})
        if self.finish_parts is not None:
            self.finish_parts(self.store, [self.store.path(TMP_DIR, PARTS_DIR, r) for r in relatives
                                           if r.startswith(KEYPOINTS_DIR + "/")])
        files = []
        for relative in relatives:
            self.store.move(self.store.path(TMP_DIR, PARTS_DIR, relative), self.store.path(relative))
            files.append(self.store.path(relative))
        if not any(f"/{KEYPOINTS_DIR}/" in f for f in files):  # every shard has a keypoints file: readers find the schema
            empty = self.store.path(KEYPOINTS_DIR, f"shard-{shard:05d}.parquet")
            self.store.write_parquet(self.keypoints_schema.empty_table(), empty, self.keypoints_schema)
            files.insert(0, empty)
        errors_by_stage: Counter[str] = Counter()
        for part in parts:
            errors_by_stage.update(json.loads(part["errors_by_stage"]))
        inputs = self.inputs[shard]
        marker = {
            "shard": shard,
            "job_id": self.target.job_id,
            "inputs": inputs.fingerprint,
            "first_key": inputs.first_key,
            "last_key": inputs.last_key,
            "plan": inputs.plan,
            "images": len({key for part in parts for key in part["images"]}),
            "instances": sum(part["instances"] for part in parts),
            "errors": sum(part["errors"] for part in parts),
            "errors_by_stage": dict(errors_by_stage),
            "images_without_boxes": sum(part["empty"] for part in parts),
            "files": files,
        }
        self.store.write_json(posixpath.join(SHARDS_DIR, f"{shard:05d}.json"), marker)
        self.committed[shard] = marker
        if self.on_commit is not None:
            self.on_commit(marker)


def _instances(rows: pa.Table, target: PartTarget) -> pa.Table:
    experts = rows.column("expert").to_pylist()
    run = {
        "job_id": [target.job_id] * len(experts),
        "model_id": [target.models[e][0] for e in experts],
        "model_revision": [target.models[e][1] for e in experts],
    }
    return pa.table({name: pa.array(run[name], pa.string()) if name in run
                     else rows.column(name) if name in rows.column_names  # track_id: linked when the shard commits
                     else pa.nulls(rows.num_rows, KEYPOINTS_SCHEMA.field(name).type)
                     for name in KEYPOINTS_SCHEMA.names}, schema=KEYPOINTS_SCHEMA)


def _errors_of(rows: pa.Table, job_id: str) -> pa.Table:
    """Failure rows (with error_stage and error_reason) as errors-table rows."""
    n = rows.num_rows
    return pa.table({
        "job_id": pa.array([job_id] * n, pa.string()), "image_key": rows.column("image_key"),
        "image_uri": rows.column("image_uri"), "instance_index": rows.column("instance_index"),
        "stage": rows.column("error_stage"), "reason": rows.column("error_reason"),
    }, schema=ERRORS_SCHEMA)


def _digest(rows: pa.Table) -> str:
    """A stable name for a part: a hash of its rows' image keys and instance indexes, in order."""
    keys = rows.column("image_key").to_pylist()
    indexes = rows.column("instance_index").to_pylist()
    return hashlib.sha1("\n".join(f"{k}\t{i}" for k, i in zip(keys, indexes)).encode()).hexdigest()[:12]


def _count_empty(rows: pa.Table) -> int:
    """Images that reached the writer with nothing to label (e.g. nothing detected)."""
    empty = pc.and_(pc.invert(rows.column("error_stage").is_valid()), pc.invert(rows.column("keypoint_x").is_valid()))
    return pc.sum(empty.cast(pa.int64())).as_py() or 0
