"""The job: plan it (no Ray), build its Ray Dataset, run it into the writer.

Stage order lives here and only here:
    image tasks -> make_crops (Ray tasks, CPU) -> PoseStage (Ray actors) -> OutputWriter (driver)
"""

from __future__ import annotations

import logging
import platform
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from raypose import __version__
from raypose.boxes import attach_boxes, load_boxes
from raypose.crops import make_crops
from raypose.errors import JobFailed, SpecError
from raypose.keypoint_schemas import EXPERT_SCHEMA, SCHEMAS
from raypose.pose import ModelInfo, PoseStage, inspect_model
from raypose.reader import list_images
from raypose.spec import JobSpec
from raypose.writer import OutputWriter, check_output, clear_output

log = logging.getLogger(__name__)


@dataclass
class JobPlan:
    """A validated job with its inputs resolved: everything known before Ray starts."""

    spec: JobSpec
    job_id: str
    model: ModelInfo
    tasks: pa.Table  # one row per image that has boxes (table.IMAGE_TASK_SCHEMA)
    missing: pa.Table  # errors for boxes whose image is not in storage
    counts: dict[str, int]


@dataclass
class JobResult:
    """What a finished job wrote and how fast."""

    job_id: str
    output_path: str
    counts: dict[str, Any]
    seconds: dict[str, float]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def crops_per_second(self) -> float:
        return self.manifest["throughput"]["crops_per_second"]


def plan_job(spec: JobSpec) -> JobPlan:
    """Check everything that can be checked without Ray: model config, inputs, boxes, output."""
    model = inspect_model(spec.pose)
    check_output(spec.output, spec.output_storage_options())
    images = list_images(spec.images)
    box_set = load_boxes(spec.boxes, spec.boxes_storage_options())
    tasks, missing, counts = attach_boxes(images, box_set)
    if not counts["boxes"] and not counts["boxes_without_image"]:
        raise SpecError(
            f"boxes: no box to label: {counts['boxes_dropped_by_filters']} were dropped by the filters "
            f"(boxes.categories {spec.boxes.categories}, min_area {spec.boxes.min_area}, "
            f"min_score {spec.boxes.min_score}, include_crowd {spec.boxes.include_crowd})"
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    job_id = f"{spec.name}-{stamp}-{uuid.uuid4().hex[:6]}"
    return JobPlan(spec=spec, job_id=job_id, model=model, tasks=tasks, missing=missing, counts=counts)


def build_pose_dataset(plan: JobPlan, gpus_in_cluster: float = 0.0):
    """The Ray Dataset of pose rows (table.POSE_OUTPUT_SCHEMA) for a planned job."""
    import ray.data

    spec = plan.spec
    per_task = spec.resources.images_per_crop_task
    blocks = [plan.tasks.slice(i, per_task) for i in range(0, plan.tasks.num_rows, per_task)]
    crops = ray.data.from_arrow(blocks).map_batches(
        make_crops,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={
            "input_size": plan.model.input_size,
            "storage_options": dict(spec.images.storage_options),
            "max_pixels": spec.images.max_pixels,
        },
        num_cpus=1,
    )
    gpus = spec.resources.gpus_per_pose_actor
    if gpus is None:
        gpus = 1.0 if gpus_in_cluster and spec.pose.device != "cpu" else 0.0
    pose = spec.pose
    if gpus == 0 and pose.device == "auto":
        pose = pose.model_copy(update={"device": "cpu"})
    return crops.map_batches(
        PoseStage,
        fn_constructor_kwargs={"pose": pose, "num_threads": max(1, int(spec.resources.cpus_per_pose_actor))},
        batch_size=spec.pose.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=spec.resources.pose_actors),
        num_cpus=spec.resources.cpus_per_pose_actor,
        num_gpus=gpus,
    )


def run_job(plan: JobPlan) -> JobResult:
    """Run a planned job on the Ray cluster this process is connected to (starting a local one if none)."""
    import ray

    spec = plan.spec
    started = time.time()
    if not ray.is_initialized():
        ray.init(num_cpus=spec.resources.num_cpus, include_dashboard=False, log_to_driver=False)
    ray_ready = time.time()
    if spec.output.mode == "overwrite":
        clear_output(spec.output, spec.output_storage_options())
    schema = SCHEMAS[EXPERT_SCHEMA[spec.pose.expert]]
    writer = OutputWriter(
        spec.output,
        spec.output_storage_options(),
        job_id=plan.job_id,
        model_id=plan.model.model_id,
        model_revision=plan.model.revision,
        schemas=[schema],
    )
    writer.write_errors(plan.missing)
    log.info("job %s: %d images with boxes, %d boxes", plan.job_id, plan.counts["images_with_boxes"], plan.counts["boxes"])
    if plan.tasks.num_rows:
        dataset = build_pose_dataset(plan, ray.cluster_resources().get("GPU", 0.0))
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.write(batch)
    written = writer.close()
    finished = time.time()
    pipeline_seconds = finished - ray_ready
    counts = {**plan.counts, "instances": written["instances"], "errors": written["errors"],
              "errors_by_stage": written["errors_by_stage"]}
    manifest = {
        "job_id": plan.job_id,
        "name": spec.name,
        "status": "succeeded" if written["instances"] or not plan.counts["boxes"] else "failed",
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "seconds": {"total": finished - started, "ray_start": ray_ready - started, "pipeline": pipeline_seconds},
        "throughput": {
            "crops_per_second": written["instances"] / pipeline_seconds if pipeline_seconds > 0 else 0.0,
            "images_per_second": plan.counts["images_with_boxes"] / pipeline_seconds if pipeline_seconds > 0 else 0.0,
        },
        "counts": counts,
        "model": {"id": plan.model.model_id, "revision": plan.model.revision,
                  "input_size": list(plan.model.input_size), "num_keypoints": plan.model.num_keypoints},
        "files": {"keypoints": written["keypoint_files"], "errors": written["error_files"]},
        "spec": spec.redacted(),
        "spec_fingerprint": spec.fingerprint(),
        "versions": _versions(),
    }
    writer.write_manifest(manifest)
    result = JobResult(
        job_id=plan.job_id, output_path=spec.output.path, counts=counts,
        seconds=manifest["seconds"], manifest=manifest,
    )
    if manifest["status"] == "failed":
        raise JobFailed(
            f"job {plan.job_id}: every input failed ({written['errors']} errors, "
            f"{dict(written['errors_by_stage'])}); see {spec.output.path}/errors/"
        )
    return result


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import transformers

    return {
        "raypose": __version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")
