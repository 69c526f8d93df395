"""The `corrections/` table of an output: reviewers' keypoints, written by `raypose import`, read by export and inspect.

The review side's own table beside the keypoints: Parquet parts under `corrections/`, each a
set of rows (`schema.CORRECTIONS_SCHEMA`) never rewritten. An import writes only the rows the
table does not hold yet (same tool, task, annotation, time and instance), so importing one export
twice changes nothing. Several annotations of one instance (two reviewers, a later edit): the
latest `reviewed_at` wins, then the highest annotation id.
"""

from __future__ import annotations

import hashlib
import math
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypose.review.reading import JobOutput, OutputError
from raypose.review.selection import rows_of
from raypose.schema import CORRECTIONS_SCHEMA

CORRECTIONS_DIR = "corrections"
IDENTITY = ["tool", "task_id", "annotation_id", "reviewed_at", "image_key", "instance_index", "new_instance"]


def read_corrections(job: JobOutput) -> pa.Table | None:
    """Every stored correction row, or None when nothing was imported."""
    return job.read(CORRECTIONS_SCHEMA.names, table=CORRECTIONS_DIR)


def latest_corrections(job: JobOutput) -> list[dict]:
    """One row per corrected instance (the latest annotation of it), sorted by image key and instance."""
    table = read_corrections(job)
    if table is None:
        return []
    latest: dict[tuple, dict] = {}
    for row in table.to_pylist():
        instance = (row["image_key"], row["instance_index"], row["new_instance"])
        rank = (row["reviewed_at"], row["annotation_id"] or "")
        if instance not in latest or rank > (latest[instance]["reviewed_at"], latest[instance]["annotation_id"] or ""):
            latest[instance] = row
    return sorted(latest.values(), key=lambda r: (r["image_key"], r["instance_index"] if r["instance_index"] is not None
                                                  else 1 << 31, r["new_instance"] or ""))


def write_corrections(job: JobOutput, rows: list[dict]) -> int:
    """Add the rows the table does not hold yet, as one new part; return how many were added."""
    new = pa.Table.from_pylist(rows, schema=CORRECTIONS_SCHEMA)
    existing = read_corrections(job)
    if existing is not None and new.num_rows:
        held = {tuple(r[name] for name in IDENTITY) for r in existing.select(IDENTITY).to_pylist()}
        fresh = [tuple(r[name] for name in IDENTITY) not in held for r in new.select(IDENTITY).to_pylist()]
        new = new.filter(pa.array(fresh, pa.bool_()))
    if not new.num_rows:
        return 0
    digest = hashlib.sha256(repr(new.select(IDENTITY).to_pylist()).encode()).hexdigest()[:16]
    folder = job.path(CORRECTIONS_DIR)
    path = posixpath.join(folder, f"part-{digest}.parquet")
    try:
        job.fs.makedirs(folder, exist_ok=True)
        with job.fs.open(path + ".tmp", "wb") as f:
            pq.write_table(new, f, compression="zstd")
        job.fs.mv(path + ".tmp", path)  # readers list *.parquet: a part is seen whole or not at all
    except Exception as exc:
        raise OutputError(f"corrections: cannot write {path}: {type(exc).__name__}: {exc}") from exc
    return new.num_rows


def current_corrections(reviewed: list[dict], rows: list[dict]) -> tuple[list[dict], int]:
    """The corrections of these rows' images that still apply, and how many no longer do: a correction holds for
    the run that wrote its rows (`job_id`); an image relabelled since (append, a changed image) has new rows."""
    instance_job = {(r["image_key"], r["instance_index"]): r["job_id"] for r in rows}
    image_job = {r["image_key"]: r["job_id"] for r in rows}
    current, stale = [], 0
    for c in reviewed:
        if c["image_key"] not in image_job:
            continue  # an image this export does not cover
        written_by = image_job[c["image_key"]] if c["instance_index"] is None else \
            instance_job.get((c["image_key"], c["instance_index"]))
        if written_by == c["job_id"]:
            current.append(c)
        else:
            stale += 1
    return current, stale


def review_summary(job: JobOutput) -> dict | None:
    """How many instances reviewers saw, deleted and added, and per keypoint name how far they moved the
    predictions (image pixels, and as a fraction of the box's size sqrt(w x h)): the pseudo-labels' real error."""
    every = latest_corrections(job)
    if not every:
        return None
    columns = ["image_key", "instance_index", "keypoint_schema", "bbox", "keypoint_x", "keypoint_y", "job_id"]
    rows = [r for rows in rows_of(job, sorted({c["image_key"] for c in every}), columns).values() for r in rows]
    reviewed, stale = current_corrections(every, rows)
    kept = [c for c in reviewed if c["instance_index"] is not None and not c["deleted"]]
    predicted = {(r["image_key"], r["instance_index"]): r for r in rows}
    per_schema: dict[str, dict] = {}
    for correction in kept:
        row = predicted.get((correction["image_key"], correction["instance_index"]))
        if row is None or row["keypoint_schema"] != correction["keypoint_schema"]:
            continue
        distance = np.hypot(np.asarray(correction["keypoint_x"], np.float64) - np.asarray(row["keypoint_x"], np.float64),
                            np.asarray(correction["keypoint_y"], np.float64) - np.asarray(row["keypoint_y"], np.float64))
        labelled = np.asarray(correction["keypoint_visibility"]) > 0
        size = math.sqrt(max(float(row["bbox"][2]) * float(row["bbox"][3]), 1e-9))
        acc = per_schema.setdefault(row["keypoint_schema"], {"instances": 0, "sum": np.zeros(len(distance)),
                                                             "n": np.zeros(len(distance), np.int64)})
        acc["instances"] += 1
        acc["sum"] += np.where(labelled, distance, 0.0)
        acc["n"] += labelled
        acc.setdefault("fraction", np.zeros(len(distance)))
        acc["fraction"] += np.where(labelled, distance / size, 0.0)
    schemas = {}
    for name, acc in sorted(per_schema.items()):
        names = job.schema(name)["keypoints"]
        schemas[name] = {"instances": acc["instances"], "keypoints": [
            {"name": names[k], "labelled": int(acc["n"][k]),
             "mean_pixels": float(acc["sum"][k] / acc["n"][k]) if acc["n"][k] else None,
             "mean_fraction_of_box": float(acc["fraction"][k] / acc["n"][k]) if acc["n"][k] else None}
            for k in range(len(names))]}
    return {"reviewed": len(kept), "deleted": sum(1 for c in reviewed if c["deleted"]),
            "added": sum(1 for c in reviewed if c["instance_index"] is None and not c["deleted"]),
            "stale": stale, "reviewers": sorted({c["reviewer"] for c in reviewed if c["reviewer"]}), "by_schema": schemas}
