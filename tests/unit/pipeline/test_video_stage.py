"""The video read stage without Ray: a range's frames decoded into image tasks; what cannot be decoded is a failure row."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from helpers import crop_options
from PIL import Image

from raypose.config.spec import VideoSpec
from raypose.inputs.video import index_videos, with_frames
from raypose.pipeline.crop_stage import make_crops
from raypose.pipeline.video_stage import read_frames
from raypose.schema import IMAGE_TASK_SCHEMA
from raypose.testing.synthetic import make_video

av = pytest.importorskip("av")


def frame_tasks(listing: pa.Table, boxes: list) -> pa.Table:
    """Image tasks of listed frames, each with `boxes` (as the plan makes them)."""
    n = listing.num_rows
    tasks = pa.Table.from_pylist([{"image_key": key, "image_uri": uri, "box_xywh": boxes, "annotation_id": [None] * len(boxes),
                                   "category": ["person"] * len(boxes), "box_score": [None] * len(boxes), "box_source": "table"}
                                  for key, uri in zip(listing.column("image_key").to_pylist(),
                                                      listing.column("image_uri").to_pylist())], schema=IMAGE_TASK_SCHEMA)
    return with_frames(tasks, listing) if n else tasks


def test_a_range_becomes_frames_and_a_damaged_one_a_failure_row(tmp_path):
    path = tmp_path / "clip.mp4"
    make_video(path, frames=12, size=(64, 48))
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    data = bytearray(path.read_bytes())
    pos, size = packets[8]
    data[pos:pos + size] = b"\xff" * size
    path.write_bytes(bytes(data))
    listing, failed, _ = index_videos(pa.table({"image_key": ["clip.mp4", "gone.mp4"],
                                                "image_uri": [path.as_uri(), (tmp_path / "gone.mp4").as_uri()]}),
                                      {}, VideoSpec())
    failed = pa.Table.from_pylist([{"image_key": r["image_key"], "image_uri": r["image_uri"], "box_xywh": [],
                                    "error_stage": r["error_stage"], "error_reason": r["error_reason"]}
                                   for r in failed.to_pylist()], schema=IMAGE_TASK_SCHEMA)
    tasks = pa.concat_tables([frame_tasks(listing, [[4, 4, 20, 30]]), failed])
    out = pa.concat_tables(list(read_frames(tasks, storage_options={})))
    rows = {row["image_key"]: row for row in out.to_pylist()}
    assert len(rows) == 13 and rows["gone.mp4"]["error_stage"] == "read"
    broken = [key for key, row in rows.items() if key.startswith("clip") and row["error_stage"]]
    assert len(broken) in (1, 2) and rows[broken[0]]["error_stage"] == "decode"
    for i, frame in enumerate(frames):
        key = f"clip.mp4#{i:06d}"
        if key not in broken:  # a frame is a PPM of PyAV's pixels: an image for every later stage
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rows[key]["image_bytes"]))), frame)
    crops = make_crops(out, options=crop_options({"coco": (48, 64)})).to_pylist()
    failures = {r["image_key"]: r["error_stage"] for r in crops if r["error_stage"]}
    assert failures == {"gone.mp4": "read", **{key: "decode" for key in broken}}
    assert {r["frame_index"] for r in crops if r["image_key"].startswith("clip")} == set(range(12))
