"""The job's stages as data: each is a callable, its arguments, and how Ray runs it (`map_batches` arguments).

Stage order lives here and only here:

    image tasks -> [detect (actors)] -> [crop or read tasks (CPU)] -> pose (actors) -> write (tasks)
                -> the writer's commits (driver)

Resources come from the layout, never from the stage code; a stage's callable runs on a plain
pyarrow batch without Ray (the tests call them so).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from raypose.config.spec import JobSpec
from raypose.models.routing import Routing
from raypose.output.writer import PartTarget, write_parts
from raypose.pipeline.detect_stage import DetectStage
from raypose.pipeline.faults import fault_env
from raypose.pipeline.layout import ActorPool, Layout
from raypose.pipeline.plan import JobPlan
from raypose.pipeline.pose_stage import PoseStage
from raypose.pipeline.video_stage import read_frames


def rows_per_part(images_per_shard: int, boxes_per_image: float, job_rows: int) -> int:
    """Rows a write task takes at a time: about a quarter of a shard's rows (at most 8192), so that a
    shard has a few files, not one per pose batch, and still commits soon after its last image
    (a write task waits until it has its rows); and at most a quarter of the job's, so that even a
    small job's first write starts its worker while the pose stage runs, not after it."""
    shard_rows = images_per_shard * max(1.0, boxes_per_image)
    return max(1, min(8192, round(shard_rows / 4), math.ceil(job_rows / 4)))


@dataclass(frozen=True)
class Stage:
    """One step of the Dataset: a function (run as Ray tasks) or a class (an actor pool), and its arguments."""

    name: str
    fn: Callable
    fn_args: dict[str, Any]  # fn_kwargs of a function, fn_constructor_kwargs of a class
    map_args: dict[str, Any] = field(default_factory=dict)  # batch_size, num_cpus, num_gpus, retries, ...
    pool: ActorPool | None = None  # an actor stage's pool (None: Ray tasks)

    def with_fn(self, fn: Callable) -> "Stage":
        """The same stage running another callable of the same kind (a traced wrapper, say)."""
        return replace(self, fn=fn)

    def apply(self, dataset):
        """`dataset.map_batches` of this stage, on pyarrow batches."""
        kwargs = dict(self.map_args)
        if self.pool is not None:
            kwargs["fn_constructor_kwargs"] = self.fn_args
            kwargs["compute"] = _actor_pool(self.pool)
        else:
            kwargs["fn_kwargs"] = self.fn_args
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for retries and warns that ray_remote_args will go
            # (2.64): silenced here, where raypose knows the reason; revisit when upgrading.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            return dataset.map_batches(self.fn, batch_format="pyarrow", **kwargs)


def job_stages(plan: JobPlan, layout: Layout, target: PartTarget | None = None) -> list[Stage]:
    """The job's stages in order, each with its arguments and resources; with `target`, the write tasks last."""
    stages = labelling_stages(plan.spec, plan.routing, plan.detector is not None, layout)
    if target is not None:
        spec = plan.spec
        boxes_per_image = plan.counts["boxes"] / max(1, plan.counts["images_with_boxes"])
        # The rows are written where they are made; only each part's summary reaches the driver.
        # No CPU reserved: they mostly wait on storage, and must never wait for a pose actor's CPU.
        stages.append(Stage("write", write_parts, {"target": target},
                            {"batch_size": rows_per_part(spec.output.images_per_shard, boxes_per_image,
                                                         plan.counts["boxes"] + plan.counts["images_to_detect"]),
                             "num_cpus": 0, **_task_args(spec)}))
    return stages


def labelling_stages(spec: JobSpec, routing: Routing, detecting: bool, layout: Layout) -> list[Stage]:
    """Image tasks -> pose rows (`schema.POSE_OUTPUT_SCHEMA`): [detect] -> [crop or read tasks] -> pose.

    A job's stages before its writes, and what `raypose.annotate` applies to a user's Dataset.
    """
    retries = spec.limits.max_retries
    # Dead workers are retried (tasks re-run, actors restart and retry), at most max_retries times;
    # Ray Data's own default for actor pools is to retry forever, which a poison batch would.
    task_args = _task_args(spec)
    actor_args = {"max_restarts": retries, "max_task_retries": retries, **_runtime_env()}
    stages = []
    if spec.images.format == "video":  # frames decoded a block a task; from here on they are images
        stages.append(Stage("read_frames", read_frames, {"storage_options": dict(spec.images.storage_options)},
                            {"batch_size": None, "num_cpus": 1, **task_args}))
    if detecting:
        stages.append(Stage(
            "detect", DetectStage,
            {"detector": spec.boxes.detector, "categories": spec.boxes.categories,
             "storage_options": dict(spec.images.storage_options), "max_pixels": spec.images.max_pixels,
             "device": layout.detector_device, "dtype": layout.detector_dtype,
             "num_threads": layout.detector_threads, "image_column": spec.images.image_column},
            {"batch_size": spec.boxes.detector.batch_size, "num_cpus": layout.detector_pool.cpus,
             "num_gpus": layout.detector_pool.gpus, **actor_args},
            pool=layout.detector_pool,
        ))
    if layout.crops.task is not None:
        fn, kwargs = layout.crops.task
        stages.append(Stage(fn.__name__, fn, kwargs, {"batch_size": None, "num_cpus": 1, **task_args}))
    pool = layout.pose_pool
    stages.append(Stage(
        "pose", PoseStage,
        {"routing": routing, "settings": layout.pose, "cropper": layout.crops.cropper},
        {"batch_size": layout.crops.rows_per_call, "num_cpus": pool.cpus, "num_gpus": pool.gpus, **actor_args},
        pool=pool,
    ))
    return stages


def _task_args(spec: JobSpec) -> dict[str, Any]:
    """A task stage's retries (and the test faults' environment)."""
    return {"max_retries": spec.limits.max_retries, **_runtime_env()}


def _runtime_env() -> dict[str, Any]:
    env = fault_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def _actor_pool(pool: ActorPool):
    """A fixed pool, or one Ray Data scales from min to max actors as work queues up; with calls > 1 each
    actor runs that many calls in threads (PoseStage lets one forward run at a time)."""
    import ray.data

    size = {"size": pool.min_actors} if not pool.autoscales else {"min_size": pool.min_actors,
                                                                    "max_size": pool.max_actors}
    if pool.calls == 1:
        return ray.data.ActorPoolStrategy(**size)
    return ray.data.ActorPoolStrategy(**size, max_concurrent_calls_per_actor=pool.calls,
                                      enable_true_multi_threading=True)
