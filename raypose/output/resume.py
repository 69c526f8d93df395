"""Runs that build on runs: a job's identity, its shards, and what an output's committed shards already hold.

One owner for what makes reruns idempotent. An output is a set of shards, each a run of image keys
in order; a run plans the images it must label as new shards numbered after the output's last.
Whatever the mode, one rule decides which images a run labels:

    kept        a committed shard holds the image with the same input fingerprint: not labelled again
    changed     a committed shard holds it with another fingerprint (the file was replaced, or its
                boxes changed): labelled again, and its rows in the old shard removed first (`supersede`)
    new         no committed shard holds it: labelled

An image's input fingerprint (`input_fingerprints`) covers what the store says of its file (size,
and ETag, generation or mtime where the store has one) and its boxes. Modes differ only in which
run they are: `error`/`overwrite` start an output, `resume` finishes the run an interrupted job
left (its job id), `append` adds a run (a new job id). Each shard's image tasks are written to
`_plan/NNNNN.parquet` before it is labelled; its commit marker (`_shards/NNNNN.json`) makes it
count, and the plan file stays as the index of what the shard holds. The result key, every setting
that decides the rows, is checked before an output is resumed or appended to, so an output never
mixes rows made by different models, settings, dtypes or decoders; a refusal names what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypose.config.spec import JobSpec, row_deciding_fields
from raypose.errors import SpecError
from raypose.inputs.arrays import row_hashes
from raypose.output.writer import (
    ERRORS_DIR,
    JOB_FILE,
    KEYPOINTS_DIR,
    PARTS_DIR,
    PLAN_DIR,
    SHARDS_DIR,
    TMP_DIR,
    OutputStore,
    ShardInputs,
)
from raypose.schema import IMAGE_TASK_SCHEMA

JOB_ID_ENV = "RAYPOSE_JOB_ID"  # set by `submit --address` for the run on the cluster: its job_id is the submission id
# _job.json's "layout": shards are sets of images with per-image fingerprints, indexed by their _plan files.
# Outputs written before (shards as fixed key ranges, or hashed) are refused by resume and append, naming the fix.
LAYOUT = 2

# The spec fields that decide how a job's rows are made, as the spec says (`decides_rows`): resources, batch
# sizes, limits, output layout and credentials do not. Where the images and boxes are (images.path,
# boxes.path) does not either: which images an output holds, and with which boxes, is each image's input
# fingerprint's to say, so a growing bucket can be read through a listing one night and an inventory the
# next. The device and dtype the layout resolves, and the decoder, are added to the key from the layout.
RESULT_FIELDS = row_deciding_fields()
# What an image's input fingerprint covers: what the store says of its file, and its boxes.
FINGERPRINTED = ("image_size", "image_version", "box_xywh", "annotation_id", "category", "box_score",
                 "expected_width", "expected_height", "needs_detection")


def new_job_id(name: str) -> str:
    """A fresh job id: the job's name, the UTC time and a random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{name}-{stamp}-{uuid.uuid4().hex[:6]}"


def result_key(spec: JobSpec, models: dict[str, str], resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every setting that decides the output rows, by field name: the spec fields that say so, the
    models' revisions, and (once the layout is known) what it resolved: device, dtype, decoder."""
    data = spec.model_dump(mode="json")
    key: dict[str, Any] = {}
    for name in RESULT_FIELDS:
        node = data
        for part in name.split("."):
            node = node[part]
        key[name] = node
    if not spec.boxes.detects:
        key = {name: value for name, value in key.items() if not name.startswith("boxes.detector.")}
    if spec.images.format != "video":  # outputs of images keep the key they had
        key = {name: value for name, value in key.items() if not name.startswith("images.video.") and name != "pose.track"}
    key.update({f"models.{name}": revision for name, revision in models.items()})
    key.update({f"layout.{name}": value for name, value in (resolved or {}).items()})
    return key


def fingerprint(key: dict[str, Any]) -> str:
    """A short hash of a result key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def check_resumable(previous: dict[str, Any], key: dict[str, Any], output_path: str, mode: str = "resume") -> None:
    """Refuse to resume or append to an output whose rows were made with other settings, naming each one that
    changed. Only the names in `key` are compared, so the plan checks the spec before Ray starts and the run
    checks what the layout resolved."""
    before = previous.get("result_key")
    fix = "use output.mode: overwrite, another output.path, or --force to go on anyway"
    if before is None:
        raise SpecError(f"output.mode: {mode}: the output at {output_path} was written by an earlier raypose "
                        f"that recorded no result key; {fix}")
    changed = [f"{name}: {_shown(before.get(name))} -> {_shown(value)}"
               for name, value in sorted(key.items()) if before.get(name) != value]
    if changed:
        raise SpecError(f"output.mode: {mode}: the output at {output_path} was made with other settings "
                        f"({'; '.join(changed)}); {fix}")


def check_layout(previous: dict[str, Any], output_path: str, mode: str) -> None:
    """Refuse to build on an output whose shards an earlier raypose laid out otherwise."""
    if previous.get("layout") != LAYOUT:
        raise SpecError(
            f"output.mode: {mode}: the output at {output_path} was written by an earlier raypose whose shards "
            "cannot be extended (fixed key ranges, without per-image fingerprints); rebuild it once with "
            "output.mode: overwrite (or write to a new output.path), then resume and append work on it")


def input_fingerprints(tasks: pa.Table) -> pa.Array:
    """Each image task's input fingerprint: a hash of what the store says of its file and of its boxes."""
    return pa.array(row_hashes([tasks.column(name) for name in FINGERPRINTED]).view(np.int64), pa.int64())


def shard_fingerprint(keys: pa.Array | pa.ChunkedArray, fingerprints: pa.Array | pa.ChunkedArray) -> str:
    """A short hash of a shard's images and their input fingerprints."""
    hashes = row_hashes([keys, fingerprints])
    return hashlib.sha256(hashes.tobytes()).hexdigest()[:16]


@dataclass
class OutputState:
    """What an output holds before a run: the last run's `_job.json`, the shards committed whole, and the
    files of shards that are not (an interrupted run's, or a committed shard with files missing)."""

    previous: dict[str, Any] | None
    committed: dict[int, dict]
    leftovers: list[str]

    @classmethod
    def read(cls, store: OutputStore) -> OutputState:
        previous = store.read_json(JOB_FILE)
        markers = store.committed_shards()
        present = set()
        for folder in (KEYPOINTS_DIR, ERRORS_DIR, PLAN_DIR, posixpath.join(TMP_DIR, PARTS_DIR)):
            if store.fs.exists(store.path(folder)):
                present.update(store.fs.find(store.path(folder)))
        committed = {shard: marker for shard, marker in markers.items()
                     if marker.get("plan") and all(_relative(store, f) in present for f in [*marker["files"], marker["plan"]])}
        kept = {_relative(store, f) for marker in committed.values() for f in [*marker["files"], marker["plan"]]}
        leftovers = sorted(p for p in present if p not in kept and _shard_file(p))
        leftovers += [store.path(SHARDS_DIR, f"{shard:05d}.json") for shard in markers if shard not in committed]
        return cls(previous=previous, committed=committed, leftovers=leftovers)

    @property
    def next_shard(self) -> int:
        """The number the run's first new shard takes: after every committed one."""
        return max(self.committed, default=-1) + 1

    def clean(self, store: OutputStore) -> None:
        """Remove the leftovers (before a run writes shards that may take their numbers)."""
        for path in self.leftovers:
            try:
                store.fs.rm(path)
            except FileNotFoundError:
                pass


def _relative(store: OutputStore, path: str) -> str:
    """A marker's file as the store's `find` gives it (markers record full paths; older ones may differ in scheme)."""
    return store.fs._strip_protocol(path)


def _shard_file(path: str) -> bool:
    return posixpath.basename(path)[:5].isdigit() or posixpath.basename(path).startswith("shard-")


class CommittedIndex:
    """The images the committed shards hold, looked up chunk by chunk in key order.

    Each committed shard's plan file is its index (image keys and input fingerprints, sorted). A
    lookup loads the shards whose key range overlaps the chunk's and forgets those the keys have
    passed, so a plan over millions of images holds the shards near its place in the key order.
    """

    def __init__(self, store: OutputStore, committed: dict[int, dict]):
        self.store = store
        self.shards = sorted((m["first_key"], m["last_key"], s) for s, m in committed.items() if m.get("images"))
        self.plans = {s: m["plan"] for s, m in committed.items()}
        self.next = 0  # the first shard (by first key) not loaded yet
        self.loaded: dict[int, tuple[str, pa.Table]] = {}  # shard -> (its last key, its keys and fingerprints)

    def lookup(self, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """For sorted keys: the committed shard holding each (-1: none) and the input fingerprint it was labelled with."""
        shard = np.full(len(keys), -1, np.int32)
        held = np.zeros(len(keys), np.int64)
        if not len(keys):
            return shard, held
        low, high = keys[0].as_py(), keys[-1].as_py()
        self.loaded = {s: entry for s, entry in self.loaded.items() if entry[0] >= low}
        while self.next < len(self.shards) and self.shards[self.next][0] <= high:
            first, last, s = self.shards[self.next]
            if last >= low:
                self.loaded[s] = (last, self.store.read_parquet(self.plans[s], ["image_key", "input_fingerprint"]))
            self.next += 1
        for s, (_, table) in sorted(self.loaded.items()):  # an image in two shards: the later one is current
            where = pc.index_in(keys, table.column("image_key"))
            found = np.asarray(where.is_valid())
            if found.any():
                shard[found] = s
                held[found] = np.asarray(table.column("input_fingerprint").take(where.filter(where.is_valid())))
        return shard, held


@dataclass
class ShardPlan:
    """What a run does: the shards it writes (their plan files written), those it keeps, and the images it
    relabels whose old rows must go first."""

    job_id: str
    to_write: dict[int, ShardInputs]
    reused: dict[int, dict]
    superseded: dict[int, list[str]] = field(default_factory=dict)  # committed shard -> keys of images that changed
    images: int = 0  # images this run labels
    kept: int = 0  # listed images that committed shards already hold

    @property
    def num_shards(self) -> int:
        """Shards the output holds once this run is done."""
        return len(self.reused) + len(self.to_write)

    def plan_files(self, store: OutputStore) -> list[str]:
        """The plan files of the shards this run writes, in order."""
        return [store.path(PLAN_DIR, f"{shard:05d}.parquet") for shard in sorted(self.to_write)]


class ShardCutter:
    """Takes a run's image tasks in key order, a chunk at a time; leaves out those committed shards hold, and
    cuts the rest into shards of `images_per_shard` numbered from `first_shard`, each written to its plan file
    as soon as it is full (with `write`; without, only counted: what `validate` does)."""

    def __init__(self, store: OutputStore, state: OutputState, job_id: str, images_per_shard: int, write: bool,
                 whole_videos: bool = False):
        """`whole_videos`: the tasks are video frames (`VIDEO#NNNNNN`) and a shard ends only where a video does, so
        that each video's rows meet in one shard (its tracks are linked there, `tracks.py`)."""
        self.store, self.write, self.per_shard, self.whole_videos = store, write, images_per_shard, whole_videos
        self.index = CommittedIndex(store, state.committed)
        self.plan = ShardPlan(job_id=job_id, to_write={}, reused=dict(state.committed))
        self.next_shard = state.next_shard
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.superseded: dict[int, list[str]] = defaultdict(list)

    def add(self, tasks: pa.Table) -> None:
        """A chunk of image tasks, sorted by key, after every earlier chunk's keys."""
        if not tasks.num_rows:
            return
        fingerprints = input_fingerprints(tasks)
        tasks = tasks.set_column(tasks.schema.get_field_index("input_fingerprint"), "input_fingerprint", fingerprints)
        keys = tasks.column("image_key").combine_chunks()
        shard, held = self.index.lookup(keys)
        committed = shard >= 0
        same = committed & (held == np.asarray(fingerprints))
        for s, key in zip(shard[committed & ~same], keys.filter(pa.array(committed & ~same)).to_pylist()):
            self.superseded[int(s)].append(key)
        self.plan.kept += int(same.sum())
        todo = tasks.filter(pa.array(~same)) if same.any() else tasks
        if todo.num_rows:
            self.pending.append(todo)
            self.pending_rows += todo.num_rows
        while self.pending_rows >= self.per_shard:
            rows = self._rows_to_cut()
            if rows is None:  # the last video may go on in the next chunk
                break
            self._cut(rows)

    def finish(self) -> ShardPlan:
        """The plan, once every chunk is in (the last shard may be short)."""
        while self.pending_rows:
            self._cut((self._rows_to_cut() if self.pending_rows > self.per_shard else None) or self.pending_rows)
        self.plan.superseded = dict(self.superseded)
        return self.plan

    def _rows_to_cut(self) -> int | None:
        """How many pending tasks the next shard takes: `per_shard`, or with whole videos the frames up to the
        first video that starts at or after that many (None: none starts in what is pending)."""
        if not self.whole_videos:
            return self.per_shard
        keys = pa.concat_arrays([t.column("image_key").combine_chunks() for t in self.pending])
        videos = pc.replace_substring_regex(keys, r"#\d+$", "")
        starts = np.flatnonzero(pc.not_equal(videos.slice(1), videos.slice(0, len(videos) - 1)).to_numpy(
            zero_copy_only=False)) + 1
        later = starts[starts >= self.per_shard]
        return int(later[0]) if len(later) else None

    def _cut(self, rows: int) -> None:
        pending = pa.concat_tables(self.pending)
        shard_tasks, rest = pending.slice(0, rows), pending.slice(rows)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        shard = self.next_shard
        self.next_shard += 1
        shard_tasks = shard_tasks.set_column(shard_tasks.schema.get_field_index("shard"), "shard",
                                             pa.array(np.full(rows, shard, np.int32)))
        keys = shard_tasks.column("image_key")
        plan_file = self.store.path(PLAN_DIR, f"{shard:05d}.parquet")
        if self.write:
            self.store.write_parquet(shard_tasks.combine_chunks(), plan_file, IMAGE_TASK_SCHEMA)
        self.plan.to_write[shard] = ShardInputs(
            images=rows, fingerprint=shard_fingerprint(keys, shard_tasks.column("input_fingerprint")),
            first_key=keys[0].as_py(), last_key=keys[-1].as_py(), plan=plan_file)
        self.plan.images += rows


def job_id_for(spec: JobSpec, previous: dict[str, Any] | None) -> str:
    """Resume goes on with the interrupted job's id; any other run is a new job."""
    if spec.output.mode == "resume" and previous is not None:
        return previous["job_id"]
    return os.environ.get(JOB_ID_ENV) or new_job_id(spec.name)


def supersede(store: OutputStore, marker: dict, keys: list[str]) -> dict:
    """Remove the rows of `keys` (images that changed since) from a committed shard; returns its new marker.

    Crash-safe without rewriting rows twice: the new files are written aside, then the old files go,
    then the new ones move in, then the marker; a run killed in between leaves a marker whose files are
    missing, which the next run treats as not committed (`OutputState.read`) and labels again.
    """
    shard, gone = marker["shard"], pa.array(sorted(set(keys)), pa.string())
    rewritten, counts = [], Counter()
    errors_by_stage: Counter[str] = Counter(marker.get("errors_by_stage") or {})
    for path in [*marker["files"], marker["plan"]]:
        table = store.read_parquet(path)
        keep = pc.invert(pc.is_in(table.column("image_key"), gone))
        kept = table.filter(keep)
        removed = table.num_rows - kept.num_rows
        if f"/{ERRORS_DIR}/" in path:
            counts["errors"] += removed
            errors_by_stage.subtract(Counter(table.filter(pc.invert(keep)).column("stage").to_pylist()))
        elif f"/{KEYPOINTS_DIR}/" in path:
            counts["instances"] += removed
        name = posixpath.basename(path)
        if path == marker["plan"]:
            plan = kept
        else:
            name = f"shard-{shard:05d}-{hashlib.sha1((name + ''.join(keys)).encode()).hexdigest()[:12]}.parquet"
        target = posixpath.join(posixpath.dirname(path), name)
        aside = store.path(TMP_DIR, "superseded", posixpath.relpath(target, store.root))
        store.write_parquet(kept, aside, table.schema)
        rewritten.append((path, aside, target))
    for path, _, _ in rewritten:
        store.fs.rm(path)
    for _, aside, target in rewritten:
        store.move(aside, target)
    new = {**marker, "files": [target for path, _, target in rewritten if path != marker["plan"]],
           "images": plan.num_rows, "instances": marker["instances"] - counts["instances"],
           "errors": marker["errors"] - counts["errors"],
           "errors_by_stage": {k: v for k, v in errors_by_stage.items() if v > 0},
           "inputs": shard_fingerprint(plan.column("image_key"), plan.column("input_fingerprint")),
           "superseded": int(marker.get("superseded", 0)) + len(set(keys))}
    store.write_json(posixpath.join(SHARDS_DIR, f"{shard:05d}.json"), new)
    return new


def start_run(store: OutputStore, spec: JobSpec, plan: ShardPlan, key: dict[str, Any],
              previous: dict[str, Any] | None, started: float) -> None:
    """Before the run labels anything: the rows of changed images removed from their old shards, and the
    output's record of its runs (`_job.json`) updated with this one."""
    for shard, keys in sorted(plan.superseded.items()):
        plan.reused[shard] = supersede(store, plan.reused[shard], keys)
    runs = list((previous or {}).get("runs") or []) if spec.output.mode in ("resume", "append") else []
    record = {"job_id": plan.job_id, "mode": spec.output.mode, "started_at": iso_time(started), "finished_at": None,
              "status": "running", "shards_written": sorted(plan.to_write), "images": plan.images,
              "superseded": sum(len(keys) for keys in plan.superseded.values())}
    if runs and runs[-1]["job_id"] == plan.job_id:  # a resume goes on with its run
        record = {**runs[-1], **record, "started_at": runs[-1]["started_at"],
                  "shards_written": sorted({*runs[-1].get("shards_written", []), *plan.to_write}),
                  "images": runs[-1].get("images", 0) + plan.images if runs[-1].get("status") != "succeeded"
                  else plan.images}
        runs[-1] = record
    else:
        runs.append(record)
    store.write_json(JOB_FILE, {
        "layout": LAYOUT, "job_id": plan.job_id, "num_shards": plan.num_shards, "result_key": key,
        "result_fingerprint": fingerprint(key), "spec": spec.redacted(), "runs": runs,
    })


def finish_run(store: OutputStore, manifest: dict[str, Any]) -> int:
    """Record how the run ended in `_job.json` (its status, instances, finish time); return how many runs it records."""
    job = store.read_json(JOB_FILE)
    if not job or not job.get("runs"):
        return 0
    job["runs"][-1].update(status=manifest["status"], finished_at=manifest["finished_at"],
                           instances=manifest["counts"].get("instances_this_run", 0))
    store.write_json(JOB_FILE, job)
    return len(job["runs"])


def iso_time(ts: float) -> str:
    """A Unix time as the output's metadata writes it: UTC, ISO 8601, to the second."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _shown(value: Any) -> str:
    return json.dumps(value) if value is not None else "(none)"
