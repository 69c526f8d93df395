"""The build: a planned job and its layout -> the Ray Dataset of pose rows (`schema.POSE_OUTPUT_SCHEMA`)."""

from __future__ import annotations

from typing import Callable

from raypose.output.writer import PartTarget
from raypose.pipeline.blocks import frame_range_blocks, image_blocks
from raypose.pipeline.layout import Layout
from raypose.pipeline.plan import JobPlan
from raypose.pipeline.stages import Stage, job_stages


def build_dataset(plan: JobPlan, layout: Layout, target: PartTarget, wrap: Callable[[Stage], Stage] | None = None):
    """The job's Dataset: its image tasks in blocks of at most `layout.images_per_task` images and
    `layout.boxes_per_task` boxes (`blocks.image_blocks`), through each stage in turn,
    ending in the write tasks' summaries (`writer.PART_SUMMARY_SCHEMA`) of the parts written to `target`.

    `wrap` may replace any stage (the benchmark traces them so, with `Stage.with_fn`).
    """
    import ray.data

    if plan.spec.images.format == "video":
        blocks = frame_range_blocks(plan.tasks, layout.images_per_task)
    else:
        blocks = image_blocks(plan.tasks, layout.images_per_task, layout.boxes_per_task)
    # from_arrow runs a Ray task per block for its metadata, on the workers the pose actor could
    # start in: from_blocks reads it here and keeps the blocks as they are.
    dataset = ray.data.from_blocks(blocks)
    for stage in job_stages(plan, layout, target):
        dataset = (wrap(stage) if wrap is not None else stage).apply(dataset)
    return dataset
