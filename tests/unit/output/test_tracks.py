"""Track ids written as a shard commits: each video's instances linked over all the shard's parts, the same ids every time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypose.config.spec import OutputSpec
from raypose.imaging.keypoint_schemas import COCO17
from raypose.output.tracks import link_shard_tracks
from raypose.output.writer import OutputStore, PartTarget, ShardInputs, ShardWriter
from raypose.schema import POSE_OUTPUT_SCHEMA


def walkers(video: str, frames: int) -> list[dict]:
    """Two people walking apart in `video`, one pose row each a frame (instance 0 on the left, at first)."""
    rows = []
    for f in range(frames):
        for i, x in enumerate((10 + 2 * f, 80 - 2 * f)):
            box = [float(x), 5.0, 20.0, 40.0]
            rows.append({"image_key": f"{video}#{f:06d}", "image_uri": f"file:///{video}", "instance_index": 1 - i if f % 2 else i,
                         "frame_index": f, "frame_time": f / 10, "video_fps": 10.0, "bbox": box, "box_source": "table",
                         "expert": "coco", "keypoint_schema": "coco17", "annotation_id": i,
                         "keypoint_x": list(np.linspace(x, x + 20, 17)), "keypoint_y": list(np.linspace(5, 45, 17)),
                         "keypoint_score": [0.9] * 17, "instance_score": 0.9, "image_rows": 2, "shard": 0})
    return rows


def committed_tracks(tmp_path, name: str, batches: list[list[dict]]) -> dict:
    store = OutputStore(OutputSpec(path=str(tmp_path / name)), {})
    target = PartTarget(output=store.output, storage_options={}, job_id="j", models={"coco": ("m", "r")},
                        schemas={"coco17": COCO17.describe()})
    images = len({row["image_key"] for batch in batches for row in batch})
    writer = ShardWriter(store, target, shards={0: ShardInputs(images, "fp")}, finish_parts=link_shard_tracks)
    for batch in batches:
        writer.write(pa.Table.from_pylist(batch, schema=POSE_OUTPUT_SCHEMA))
    assert 0 in writer.committed
    table = pq.read_table(tmp_path / name / "keypoints")
    return {(r["image_key"], r["annotation_id"]): r["track_id"] for r in table.to_pylist()}


def test_each_person_keeps_one_track_over_every_part_and_the_ids_do_not_depend_on_the_parts(tmp_path):
    rows = walkers("a.mp4", 6) + walkers("b.mp4", 3)
    tracks = committed_tracks(tmp_path, "one", [rows[:7], rows[7:15], rows[15:]])
    for video, frames in (("a.mp4", 6), ("b.mp4", 3)):
        for person in (0, 1):
            assert {tracks[(f"{video}#{f:06d}", person)] for f in range(frames)} == {person}  # ids count from 0 per video
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    assert committed_tracks(tmp_path, "again", [shuffled[:5], shuffled[5:]]) == tracks  # a shard redone: the same ids
