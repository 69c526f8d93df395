"""The build: a planned job and its layout -> the Ray Dataset of pose rows (`schema.POSE_OUTPUT_SCHEMA`)."""

from __future__ import annotations

from typing import Callable

from raypose.output.writer import PartTarget
from raypose.pipeline.blocks import in_parts
from raypose.pipeline.layout import Layout
from raypose.pipeline.plan import JobPlan
from raypose.pipeline.stages import Stage, job_stages


def build_dataset(plan: JobPlan, layout: Layout, target: PartTarget, wrap: Callable[[Stage], Stage] | None = None):
    """The job's Dataset: its image tasks in blocks of `layout.images_per_task`, through each stage in turn,
    ending in the write tasks' summaries (`writer.PART_SUMMARY_SCHEMA`) of the parts written to `target`.

    `wrap` may replace any stage (the benchmark traces them so, with `Stage.with_fn`).
    """
    # Video: a read task decodes its block's frames from the keyframe before the first, so blocks are larger.
    rows = plan.spec.images.video.frames_per_task if plan.spec.images.format == "video" else layout.images_per_task
    dataset = read_plan(plan, rows, layout.boxes_per_task)
    for stage in job_stages(plan, layout, target):
        dataset = (wrap(stage) if wrap is not None else stage).apply(dataset)
    return dataset


def read_plan(plan: JobPlan, images_per_task: int, boxes_per_part: int | None = None):
    """The run's image tasks as a Dataset of blocks of `images_per_task`, read from its shards' plan files;
    an image with more than `boxes_per_part` boxes is cut into parts (`blocks.image_parts`).

    The plan files are read as the pipeline needs them (the driver holds their names, not the images)
    and cut into small blocks as they stream, so a shard's images spread over the crop tasks instead of
    one task cropping the whole shard. Reading and cutting reserve no CPU: on a CPU job the pose actors
    hold every core, and a read waiting for one would wait forever.
    """
    import ray.data

    files = ray.data.from_items([{"path": path} for path in plan.plan_files()],
                                override_num_blocks=max(1, len(plan.plan_files())))
    tasks = files.map_batches(read_plan_files, fn_kwargs={"store": plan.store, "boxes_per_part": boxes_per_part}, batch_size=1,
                              batch_format="pyarrow", num_cpus=0)
    return _in_blocks_of(tasks, images_per_task)


def read_plan_files(batch, *, store, boxes_per_part: int | None = None):
    """Plan files (a batch of their paths) -> their image tasks, crowded images in parts."""
    import pyarrow as pa

    tasks = pa.concat_tables([store.read_parquet(path) for path in batch.column("path").to_pylist()])
    return in_parts(tasks, boxes_per_part) if boxes_per_part else tasks


def _in_blocks_of(dataset, rows: int):
    """`dataset.repartition(target_num_rows_per_block=rows)` (streaming, no shuffle), reserving no CPU.

    Ray 2.60's public call takes no resources and reserves a CPU per task; the logical operator it builds
    takes them, so it is built here the way `Dataset.repartition` builds it.
    """
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import StreamingRepartition
    from ray.data.dataset import Dataset

    operator = StreamingRepartition(target_num_rows_per_block=rows, input_dependencies=[dataset._logical_plan.dag],
                                    ray_remote_args={"num_cpus": 0})
    return Dataset._from_parent(dataset, LogicalPlan(operator, dataset.context))
