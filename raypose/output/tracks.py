"""Track ids (pose.track): a shard's instances linked across each video's frames as the shard commits.

Shards hold whole videos (`resume.ShardCutter`, `whole_videos`), so when the writer has all of a shard's
rows it has all of each of its videos' rows: the keypoint parts are read back, each video's
instances linked frame by frame (`imaging/tracking.py`), and the parts rewritten with `track_id`
before they are moved into place. A shard redone on resume is linked again from the same rows,
to the same ids: exactly once, as its rows are. Ids count from 0 in each video, in order of
appearance; instances of different keypoint schemas (a person and a dog) get tracks of their own.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypose.imaging.keypoint_schemas import SCHEMAS
from raypose.imaging.tracking import FrameInstances, link_tracks
from raypose.output.writer import OutputStore

LINKED_COLUMNS = ["image_key", "instance_index", "frame_index", "keypoint_schema", "bbox", "keypoint_x", "keypoint_y",
                  "keypoint_score", "instance_score"]


def link_shard_tracks(store: OutputStore, keypoint_parts: list[str]) -> None:
    """Rewrite a shard's keypoint part files (paths in `store`) with each instance's `track_id`."""
    parts = [store.read_parquet(path) for path in keypoint_parts]
    if not parts:
        return
    ids = track_ids(pa.concat_tables([part.select(LINKED_COLUMNS) for part in parts]))
    for path, part in zip(keypoint_parts, parts):
        keys = zip(part.column("image_key").to_pylist(), part.column("instance_index").to_pylist())
        column = pa.array([ids.get(key) for key in keys], pa.int64())
        part = part.set_column(part.schema.get_field_index("track_id"), part.schema.field("track_id"), column)
        store.write_parquet(part, path, part.schema)


def track_ids(rows: pa.Table) -> dict[tuple[str, int], int]:
    """(image_key, instance_index) -> track id, for keypoint rows of video frames (`LINKED_COLUMNS`)."""
    rows = rows.filter(pc.is_valid(rows.column("frame_index")))
    videos = pc.replace_substring_regex(rows.column("image_key"), r"#\d+$", "")
    rows = rows.append_column("video", videos).sort_by([("video", "ascending"), ("keypoint_schema", "ascending"),
                                                        ("frame_index", "ascending"), ("instance_index", "ascending")])
    found: dict[tuple[str, int], int] = {}
    offsets: dict[str, int] = {}
    for start, end in _runs(rows, ["video", "keypoint_schema"]):  # sorted rows: each (video, schema) is a run
        instances = rows.slice(start, end - start)
        video, schema = instances.column("video")[0].as_py(), instances.column("keypoint_schema")[0].as_py()
        frames, per_frame = _frames(instances)
        linked = link_tracks(frames, sigmas=np.array(SCHEMAS[schema].sigmas) if SCHEMAS[schema].sigmas else None)
        offset = offsets.get(video, 0)
        for keys, ids in zip(per_frame, linked):
            found.update({key: int(i) + offset for key, i in zip(keys, ids)})
        offsets[video] = offset + (max((int(i.max()) for i in linked if len(i)), default=-1) + 1)
    return found


def _runs(rows: pa.Table, columns: list[str]) -> list[tuple[int, int]]:
    """(start, end) of each run of rows with the same values in `columns`."""
    n = rows.num_rows
    if not n:
        return []
    changed = np.zeros(n, bool)
    changed[0] = True
    for name in columns:
        values = rows.column(name).combine_chunks()
        changed[1:] |= np.asarray(pc.not_equal(values.slice(1), values.slice(0, n - 1)))
    starts = np.flatnonzero(changed)
    return list(zip(starts.tolist(), [*starts[1:].tolist(), n]))


def _frames(instances: pa.Table) -> tuple[list[FrameInstances], list[list[tuple[str, int]]]]:
    """One video's instances (sorted by frame) as each frame's `FrameInstances` and the rows' keys."""
    frame_index = instances.column("frame_index").to_numpy()
    boxes = np.array(instances.column("bbox").to_pylist(), np.float64).reshape(-1, 4)
    k = len(instances.column("keypoint_x")[0]) if instances.num_rows else 0
    xy = np.stack([np.array(instances.column(c).to_pylist(), np.float64).reshape(-1, k) for c in ("keypoint_x", "keypoint_y")], -1)
    scores = np.array(instances.column("keypoint_score").to_pylist(), np.float64).reshape(-1, k)
    instance = instances.column("instance_score").to_numpy(zero_copy_only=False).astype(np.float64)
    keys = list(zip(instances.column("image_key").to_pylist(), instances.column("instance_index").to_pylist()))
    starts = np.flatnonzero(np.diff(frame_index, prepend=frame_index[0] - 1)) if len(frame_index) else []
    ends = list(starts[1:]) + [len(frame_index)]
    frames = [FrameInstances(boxes[a:b], xy[a:b], scores[a:b], instance[a:b]) for a, b in zip(starts, ends)]
    return frames, [keys[a:b] for a, b in zip(starts, ends)]
