"""The Dataset's blocks: image tasks grouped so that no block, and so no crop task or pose call, holds too many boxes.

A block holds at most `images_per_block` images and `boxes_per_block` boxes. An image with more
boxes than that is cut into parts of at most `boxes_per_block` boxes, each a block of its own: a
part carries the instance index of its first box (`box_offset`) and its image's box count
(`image_boxes`, the rows the writer waits for), so a crop task, a pose call and the crops it
holds stay bounded however many boxes one image has.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def image_blocks(tasks: pa.Table, images_per_block: int, boxes_per_block: int) -> list[pa.Table]:
    """`tasks` in order, as blocks of at most `images_per_block` images and `boxes_per_block` boxes."""
    boxes = pc.list_value_length(tasks.column("box_xywh")).fill_null(0).to_numpy(zero_copy_only=False)
    total = np.concatenate([[0], np.cumsum(boxes)])
    blocks, start, n = [], 0, tasks.num_rows
    while start < n:
        # The last image whose boxes still fit, counting from this block's first.
        fits = int(np.searchsorted(total, total[start] + boxes_per_block, side="right")) - 1
        end = min(fits, start + images_per_block, n)
        if end > start:
            blocks.append(tasks.slice(start, end - start))
            start = end
        else:
            blocks += image_parts(tasks.slice(start, 1), boxes_per_block)
            start += 1
    return blocks


def frame_range_blocks(tasks: pa.Table, images_per_block: int) -> list[pa.Table]:
    """Video frame tasks as blocks of one range of one video each (`video_range`: what a read task decodes in
    one go); the tasks of videos that could not be read (no range) in blocks of at most `images_per_block`."""
    uris = tasks.column("image_uri").to_pylist()
    ranges = tasks.column("video_range").to_pylist()
    blocks, start = [], 0
    for row in range(1, tasks.num_rows + 1):
        if row == tasks.num_rows or (uris[row], ranges[row]) != (uris[start], ranges[start]) or (
                ranges[row] is None and row - start >= images_per_block):
            blocks.append(tasks.slice(start, row - start))
            start = row
    return blocks


def image_parts(task: pa.Table, boxes_per_part: int) -> list[pa.Table]:
    """One image task (a one-row table) cut into tasks of at most `boxes_per_part` boxes each."""
    lists = [name for name in task.column_names if pa.types.is_list(task.schema.field(name).type)]
    count = len(task.column("box_xywh")[0])
    parts = []
    for first in range(0, count, boxes_per_part):
        last = min(first + boxes_per_part, count)
        part = task
        for name in lists:  # the per-box columns (boxes, annotation ids, categories, scores)
            index = part.schema.get_field_index(name)
            part = part.set_column(index, part.schema.field(name), pc.list_slice(part.column(name), first, last))
        for name, value in (("box_offset", first), ("image_boxes", count)):
            index = part.schema.get_field_index(name)
            part = part.set_column(index, part.schema.field(name), pa.array([value], part.schema.field(name).type))
        parts.append(part)
    return parts
