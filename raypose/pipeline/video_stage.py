"""The video read stage: image tasks of video frames (a range of one video a block) -> the same tasks with their pixels.

Each block is one range of one video (`blocks.frame_range_blocks`): the task seeks to the
keyframe before the range's first frame and decodes forward (`inputs/video.decode_frames`),
turning each wanted frame upright and handing it on as a PPM in `image_bytes`. From there a
frame is an image: the detector, the crop stage and the pose stage read it as they read any.
A frame the decoder does not give becomes the frame's error (stage `decode`); the frames around
it go on. The rows are yielded a few frames at a time, so Ray Data holds a block's frames in
blocks of its own size, not the whole range in this task's memory.
"""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa

from raypose.errors import ImageError
from raypose.inputs.video import decode_frames, frame_bytes
from raypose.pipeline.faults import inject

FRAMES_PER_YIELD = 8


def read_frames(batch: pa.Table, *, storage_options: dict[str, Any]) -> Iterator[pa.Table]:
    """Frame tasks -> the same tasks, each with its frame's pixels (`image_bytes`) or its error; other rows as they are."""
    inject("video")
    tasks = batch.to_pylist()
    done: list[dict] = []
    by_video: dict[str, list[dict]] = {}
    for task in tasks:
        if task.get("frame_pts") is None or task.get("error_stage"):
            done.append(task)  # a video that could not be read, or an image: nothing to decode
        else:
            by_video.setdefault(task["image_uri"], []).append(task)
    for uri, frames in by_video.items():
        by_pts = {task["frame_pts"]: task for task in frames}
        try:
            decoded = decode_frames(uri, storage_options, sorted(by_pts))
            for pts, pixels in decoded:
                task = by_pts[pts]
                if isinstance(pixels, ImageError):
                    task["error_stage"], task["error_reason"] = pixels.stage, str(pixels)
                else:
                    task["image_bytes"] = frame_bytes(pixels)
                done.append(task)
                if len(done) >= FRAMES_PER_YIELD:
                    yield pa.Table.from_pylist(done, schema=batch.schema)
                    done = []
        except ImageError as exc:  # the file could not be opened again (gone, or a storage failure)
            for task in by_pts.values():
                if task.get("image_bytes") is None and not task.get("error_stage"):
                    task["error_stage"], task["error_reason"] = exc.stage, str(exc)
                    done.append(task)
    if done or not tasks:
        yield pa.Table.from_pylist(done, schema=batch.schema)
