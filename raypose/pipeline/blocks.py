"""Bounded work per call: an image's boxes cut into parts, and a batch of image tasks cut into chunks of few boxes.

An image with more than `resources.boxes_per_crop_task` boxes is cut into parts of at most that
many as the plan's files are read (`in_parts`): a part carries the instance index of its first
box (`box_offset`) and its image's box count (`image_boxes`, the rows the writer waits for). The
croppers then cut a block's crops a chunk of at most that many boxes at a time (`image_blocks`),
so a crop task, a pose call and the crops it holds stay bounded however many boxes one image has.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def image_blocks(tasks: pa.Table, images_per_block: int, boxes_per_block: int) -> list[pa.Table]:
    """`tasks` in order, as blocks of at most `images_per_block` images and `boxes_per_block` boxes (an empty table:
    itself, one block)."""
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
    return blocks or [tasks]


def in_parts(tasks: pa.Table, boxes_per_part: int) -> pa.Table:
    """`tasks` in order, each image with more than `boxes_per_part` boxes replaced by its parts (`image_parts`)."""
    boxes = pc.list_value_length(tasks.column("box_xywh")).fill_null(0).to_numpy(zero_copy_only=False)
    crowded = np.flatnonzero(boxes > boxes_per_part)
    if not len(crowded):
        return tasks
    pieces, start = [], 0
    for row in crowded:
        pieces += [tasks.slice(start, row - start), *image_parts(tasks.slice(row, 1), boxes_per_part)]
        start = row + 1
    return pa.concat_tables([*pieces, tasks.slice(start)])


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
