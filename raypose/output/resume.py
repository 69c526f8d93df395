"""Resume: a job's identity, its shards, and which of them an earlier run already committed.

One owner for what makes reruns idempotent: the job id, the shard each image belongs to (a
run of sorted keys, recorded by its first key, so shards complete one after another),
the fingerprint of a shard's inputs (a committed shard is reused only for the same images)
and the result key: every setting that decides the output rows, so that a resumed output
never mixes rows made by different models, settings, dtypes or decoders. A refusal names
the settings that changed.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypose.config.spec import JobSpec
from raypose.errors import SpecError
from raypose.inputs.arrays import KeySequence
from raypose.output.writer import JOB_FILE, OutputStore, ShardInputs

JOB_ID_ENV = "RAYPOSE_JOB_ID"  # set by `submit --address` for the run on the cluster: its job_id is the submission id

# The spec fields that decide a job's rows (an allow-list: resources, batch sizes, limits,
# output layout and credentials do not). The device and dtype the layout resolves, and the
# decoder, are added to the key from the layout.
RESULT_FIELDS = {
    "images": ("path", "format", "image_column", "key_column", "extensions", "max_pixels", "jpeg_draft"),
    "boxes": ("source", "path", "detect_missing", "categories", "min_area", "include_crowd", "min_score",
              "image_key_column", "bbox_column", "score_column", "category_column"),
    "boxes.detector": ("model", "revision", "threshold", "max_per_image", "min_size", "nms_iou"),
    "pose": ("model", "revision", "expert", "experts", "routing", "flip_test", "fold_expert", "decode", "track"),
    "images.video": ("every", "fps", "start", "end", "max_frames", "max_seconds", "extensions"),
}


def new_job_id(name: str) -> str:
    """A fresh job id: the job's name, the UTC time and a random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{name}-{stamp}-{uuid.uuid4().hex[:6]}"


def shard_of(image_key: str, starts: list[str]) -> int:
    """The shard an image belongs to: the last one starting at or before its key (stable across runs)."""
    return max(0, bisect.bisect_right(starts, image_key) - 1)


def hashed_shard_of(image_key: str, num_shards: int) -> int:
    """How outputs written before shards were key ranges assigned images (a resume of one keeps it)."""
    return zlib.crc32(image_key.encode("utf-8")) % num_shards


def keys_fingerprint(keys: list[str] | pa.Array) -> str:
    """A short hash of a shard's image keys: a committed shard is reused only for the same inputs."""
    keys = keys.to_pylist() if isinstance(keys, (pa.Array, pa.ChunkedArray)) else keys
    return hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()[:16]


def result_key(spec: JobSpec, models: dict[str, str], resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every setting that decides the output rows, by field name: the allow-listed spec fields, the
    models' revisions, and (once the layout is known) what it resolved: device, dtype, decoder."""
    data = spec.model_dump(mode="json")
    key: dict[str, Any] = {}
    for section, names in RESULT_FIELDS.items():
        node = data
        for part in section.split("."):
            node = node[part]
        key.update({f"{section}.{name}": node[name] for name in names})
    if spec.boxes.source != "detector" and not spec.boxes.detect_missing:
        key = {name: value for name, value in key.items() if not name.startswith("boxes.detector.")}
    if spec.images.format != "video":  # outputs of images keep the key they had
        key = {name: value for name, value in key.items() if not name.startswith("images.video.") and name != "pose.track"}
    key.update({f"models.{name}": revision for name, revision in models.items()})
    key.update({f"layout.{name}": value for name, value in (resolved or {}).items()})
    return key


def fingerprint(key: dict[str, Any]) -> str:
    """A short hash of a result key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def check_resumable(previous: dict[str, Any], key: dict[str, Any], output_path: str) -> None:
    """Refuse to resume an output whose rows were made with other settings, naming each one that changed.

    Only the names in `key` are compared, so the plan checks the spec before Ray starts and the
    run checks what the layout resolved.
    """
    before = previous.get("result_key")
    fix = "use output.mode: overwrite, another output.path, or --force to resume anyway"
    if before is None:
        raise SpecError(f"output.mode: resume: the output at {output_path} was written by an earlier raypose "
                        f"that recorded no result key; {fix}")
    changed = [f"{name}: {_shown(before.get(name))} -> {_shown(value)}"
               for name, value in sorted(key.items()) if before.get(name) != value]
    if changed:
        raise SpecError(f"output.mode: resume: the output at {output_path} was made with other settings "
                        f"({'; '.join(changed)}); {fix}")


@dataclass
class ShardPlan:
    """The job's shards: the one each image task goes to, what this run writes, and what it reuses."""

    job_id: str
    num_shards: int
    starts: list[str] | None  # each shard's first key (None: an older output's hashed shards)
    shard_of_task: np.ndarray  # per image task (sorted by key), int32
    to_write: dict[int, pa.Array]  # the shards this run writes, and their image keys
    reused: dict[int, dict]  # commit markers of shards an earlier run finished

    def inputs(self) -> dict[int, ShardInputs]:
        """What each shard this run writes is made of, for the writer's commit markers."""
        return {shard: ShardInputs(len(keys), keys_fingerprint(keys)) for shard, keys in self.to_write.items()}


def plan_shards(spec: JobSpec, keys: pa.Array, store: OutputStore, previous: dict[str, Any] | None) -> ShardPlan:
    """Assign the image tasks (`keys`, sorted) to shards; when resuming, the earlier run's shards, and those
    it committed for the same images are reused. Columnar: nothing per image in Python."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    n = len(keys)
    if previous is None:
        job_id = os.environ.get(JOB_ID_ENV) or new_job_id(spec.name)
        per = spec.output.images_per_shard
        firsts = video_shard_firsts(keys, per) if spec.images.format == "video" else np.arange(0, n, per)
        starts = keys.take(pa.array(firsts)).to_pylist() or [""]
        num_shards = len(starts)
    else:
        job_id, num_shards, starts = previous["job_id"], int(previous["num_shards"]), previous.get("shard_starts")
    if starts is not None:
        # Where each shard's first key falls among the sorted keys: its tasks are the run up to the next.
        first = [0] + [bisect.bisect_left(KeySequence(keys), start) for start in starts[1:]]
        shards = np.zeros(n, np.int32)
        for shard, begin in enumerate(first[1:], start=1):
            shards[begin:] = shard
        ends = first[1:] + [n]
        to_write = {shard: keys.slice(first[shard], ends[shard] - first[shard]) for shard in range(num_shards)}
    else:
        shards = np.array([hashed_shard_of(key, num_shards) for key in keys.to_pylist()], np.int32)
        to_write = {shard: keys.filter(pa.array(shards == shard)) for shard in range(num_shards)}
    reused = {}
    if previous is not None:
        for shard, marker in store.committed_shards().items():
            if shard in to_write and marker["inputs"] == keys_fingerprint(to_write[shard]):
                reused[shard] = marker
                del to_write[shard]
    return ShardPlan(job_id=job_id, num_shards=num_shards, starts=starts, shard_of_task=shards, to_write=to_write,
                     reused=reused)


def video_shard_firsts(keys: pa.Array, per: int) -> np.ndarray:
    """Where shards of video frames (keys `VIDEO#NNNNNN`, sorted) start: at a video's first frame, once the
    shard before holds `per` frames or more. A video is never cut, so its tracks are linked within one shard."""
    videos = pc.replace_substring_regex(keys, r"#\d+$", "")
    changes = np.flatnonzero(pc.not_equal(videos.slice(1), videos.slice(0, len(videos) - 1)).to_numpy(
        zero_copy_only=False)) + 1 if len(videos) > 1 else np.array([], np.int64)
    video_starts = np.concatenate([[0], changes]).astype(np.int64) if len(keys) else np.array([], np.int64)
    firsts = []
    for start in video_starts:
        if not firsts or start - firsts[-1] >= per:
            firsts.append(start)
    return np.array(firsts, np.int64)


def start_run(store: OutputStore, spec: JobSpec, shards: ShardPlan, key: dict[str, Any]) -> None:
    """Clear what this run replaces (the whole output with overwrite, unfinished shards always) and record the job."""
    if spec.output.mode == "overwrite":
        store.clear()
    for shard in shards.to_write:  # what an interrupted run may have left of unfinished shards
        store.remove_shard(shard)
    store.write_json(JOB_FILE, {
        "job_id": shards.job_id, "num_shards": shards.num_shards, "shard_starts": shards.starts, "result_key": key,
        "result_fingerprint": fingerprint(key), "spec": spec.redacted(),
    })


def _shown(value: Any) -> str:
    return json.dumps(value) if value is not None else "(none)"
