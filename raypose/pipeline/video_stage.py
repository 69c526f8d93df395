"""The video read stage: image tasks of video frames (a range of one video a block) -> the same tasks with their pixels.

A block is `images.video.frames_per_task` consecutive frames (of one video, or of the end of one
and the start of the next): for each video the task seeks to the keyframe before its first frame
and decodes forward (`inputs/video.decode_frames`),
turning each wanted frame upright and handing it on as a PPM in `image_bytes`. From there a
frame is an image: the detector, the crop stage and the pose stage read it as they read any.
A frame the decoder does not give becomes the frame's error (stage `decode`); the frames around
it go on. The rows are yielded a few frames at a time, so Ray Data holds a block's frames in
blocks of its own size, not the whole range in this task's memory.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from raypose.errors import ImageError
from raypose.inputs.video import decode_frames, frame_ppm
from raypose.pipeline.arrow_views import binary_column
from raypose.pipeline.faults import inject

FRAMES_PER_YIELD = 8


def read_frames(batch: pa.Table, *, storage_options: dict[str, Any]) -> Iterator[pa.Table]:
    """Frame tasks -> the same tasks in the same order, each with its frame's pixels (`image_bytes`) or its error;
    rows that are not frames to decode (a video that could not be indexed) as they are."""
    inject("video")
    pts = batch.column("frame_pts").to_pylist()
    uris = batch.column("image_uri").to_pylist()
    failed = batch.column("error_stage").is_valid().to_pylist()
    by_video: dict[str, list[int]] = {}
    for row, (uri, stamp, bad) in enumerate(zip(uris, pts, failed)):
        if stamp is not None and not bad:
            by_video.setdefault(uri, []).append(row)
    frame_rows = {row for rows in by_video.values() for row in rows}
    outcomes: dict[int, np.ndarray | ImageError] = {}
    done = 0  # the rows before this one are yielded

    def flush(final: bool = False) -> Iterator[pa.Table]:
        nonlocal done
        end = done
        while end < batch.num_rows and (end not in frame_rows or end in outcomes):
            end += 1
        while end - done >= FRAMES_PER_YIELD or (final and end > done):
            size = min(FRAMES_PER_YIELD, end - done)
            yield _frames_into(batch.slice(done, size), [outcomes.pop(row, None) for row in range(done, done + size)])
            done += size

    for uri, rows in by_video.items():
        row_of = {pts[row]: row for row in rows}
        try:
            for stamp, pixels in decode_frames(uri, storage_options, sorted(row_of)):
                outcomes[row_of[stamp]] = pixels
                yield from flush()
        except ImageError as exc:  # the file could not be opened again (gone, or a storage failure)
            for row in rows:
                outcomes.setdefault(row, exc)
    yield from flush(final=True)
    if not batch.num_rows:
        yield batch


def _frames_into(rows: pa.Table, outcomes: list) -> pa.Table:
    """`rows` with each decoded frame as PPM bytes in `image_bytes`, and each failed one's error."""
    pixels = [frame_ppm(o) if isinstance(o, np.ndarray) else None for o in outcomes]
    stages = [o.stage if isinstance(o, ImageError) else s for o, s in zip(outcomes, rows.column("error_stage").to_pylist())]
    reasons = [str(o) if isinstance(o, ImageError) else r for o, r in zip(outcomes, rows.column("error_reason").to_pylist())]
    for name, column in (("image_bytes", binary_column(pixels)), ("error_stage", pa.array(stages, pa.string())),
                         ("error_reason", pa.array(reasons, pa.string()))):
        index = rows.schema.get_field_index(name)
        rows = rows.set_column(index, rows.schema.field(name), column.cast(rows.schema.field(name).type))
    return rows
