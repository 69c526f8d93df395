"""The job: plan it (no Ray), build its Ray Dataset, run it into the writer.

Stage order lives here and only here:
    image tasks -> [DetectStage (Ray actors)] -> make_crops (Ray tasks, CPU)
                -> PoseStage (Ray actors) -> OutputWriter (driver)
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
from raypose.boxes import BoxSet, attach_boxes, load_boxes
from raypose.crops import make_crops
from raypose.detector import DetectorInfo, DetectStage, inspect_detector
from raypose.errors import JobFailed, SpecError
from raypose.keypoint_schemas import SCHEMAS
from raypose.pose import PoseStage
from raypose.reader import list_images
from raypose.routing import Routing, resolve_routing
from raypose.spec import JobSpec
from raypose.writer import OutputWriter, check_output, clear_output

log = logging.getLogger(__name__)


@dataclass
class JobPlan:
    """A validated job with its inputs resolved: everything known before Ray starts."""

    spec: JobSpec
    job_id: str
    routing: Routing
    detector: DetectorInfo | None  # when some images need detection
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
    """Check everything that can be checked without Ray: model configs, routing, inputs, boxes, output."""
    routing = resolve_routing(spec.pose)
    detecting = spec.boxes.source == "detector" or spec.boxes.detect_missing
    detector = inspect_detector(spec.boxes.detector, spec.boxes.categories) if detecting else None
    check_output(spec.output, spec.output_storage_options())
    images = list_images(spec.images)
    if spec.boxes.source == "detector":
        box_set = BoxSet(by_image={}, source="detector")
    else:
        box_set = load_boxes(spec.boxes, spec.boxes_storage_options())
    tasks, missing, counts = attach_boxes(images, box_set, detect_missing=detecting)
    if not counts["boxes"] and not counts["boxes_without_image"] and not counts["images_to_detect"]:
        raise SpecError(
            f"boxes: no box to label: {counts['boxes_dropped_by_filters']} were dropped by the filters "
            f"(boxes.categories {spec.boxes.categories}, min_area {spec.boxes.min_area}, "
            f"min_score {spec.boxes.min_score}, include_crowd {spec.boxes.include_crowd})"
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    job_id = f"{spec.name}-{stamp}-{uuid.uuid4().hex[:6]}"
    return JobPlan(
        spec=spec, job_id=job_id, routing=routing, detector=detector, tasks=tasks, missing=missing, counts=counts
    )


def build_pose_dataset(plan: JobPlan, gpus_in_cluster: float = 0.0):
    """The Ray Dataset of pose rows (table.POSE_OUTPUT_SCHEMA) for a planned job."""
    import ray.data

    spec, resources = plan.spec, plan.spec.resources
    per_task = resources.images_per_crop_task
    blocks = [plan.tasks.slice(i, per_task) for i in range(0, plan.tasks.num_rows, per_task)]
    dataset = ray.data.from_arrow(blocks)
    if plan.detector is not None:
        gpus, device = _accelerator(resources.gpus_per_detector_actor, spec.boxes.detector.device, gpus_in_cluster)
        dataset = dataset.map_batches(
            DetectStage,
            fn_constructor_kwargs={
                "detector": spec.boxes.detector.model_copy(update={"device": device}),
                "categories": spec.boxes.categories,
                "storage_options": dict(spec.images.storage_options),
                "max_pixels": spec.images.max_pixels,
                "num_threads": max(1, int(resources.cpus_per_detector_actor)),
            },
            batch_size=spec.boxes.detector.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=resources.detector_actors),
            num_cpus=resources.cpus_per_detector_actor,
            num_gpus=gpus,
        )
    routing = plan.routing
    crops = dataset.map_batches(
        make_crops,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={
            "input_sizes": {name: expert.input_size for name, expert in routing.experts.items()},
            "routes": routing.rules,
            "default_expert": routing.default,
            "storage_options": dict(spec.images.storage_options),
            "max_pixels": spec.images.max_pixels,
        },
        num_cpus=1,
    )
    gpus, device = _accelerator(resources.gpus_per_pose_actor, spec.pose.device, gpus_in_cluster)
    return crops.map_batches(
        PoseStage,
        fn_constructor_kwargs={
            "routing": routing,
            "device": device,
            "dtype": spec.pose.dtype,
            "flip_test": spec.pose.flip_test,
            "num_threads": max(1, int(resources.cpus_per_pose_actor)),
        },
        batch_size=spec.pose.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=resources.pose_actors),
        num_cpus=resources.cpus_per_pose_actor,
        num_gpus=gpus,
    )


def _accelerator(gpus: float | None, device: str, gpus_in_cluster: float) -> tuple[float, str]:
    """GPUs an actor asks for and the device it runs on: a GPU each when the cluster has them."""
    if gpus is None:
        gpus = 1.0 if gpus_in_cluster and device != "cpu" else 0.0
    if gpus == 0 and device == "auto":
        device = "cpu"
    return gpus, device


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
    experts = plan.routing.experts
    writer = OutputWriter(
        spec.output,
        spec.output_storage_options(),
        job_id=plan.job_id,
        models={name: (e.model.model_id, e.model.revision) for name, e in experts.items()},
        schemas=[SCHEMAS[name] for name in sorted({e.keypoint_schema for e in experts.values()})],
    )
    writer.write_errors(plan.missing)
    log.info("job %s started: %d images, %d boxes, %d to detect -> %s", plan.job_id, plan.counts["images"],
             plan.counts["boxes"], plan.counts["images_to_detect"], spec.output.path,
             extra={"event": "job_started", "job_id": plan.job_id, "images": plan.counts["images"],
                    "boxes": plan.counts["boxes"], "images_to_detect": plan.counts["images_to_detect"],
                    "output": spec.output.path})
    if plan.tasks.num_rows:
        dataset = build_pose_dataset(plan, ray.cluster_resources().get("GPU", 0.0))
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.write(batch)
    written = writer.close()
    finished = time.time()
    pipeline_seconds = finished - ray_ready
    counts = {**plan.counts, "instances": written["instances"], "errors": written["errors"],
              "errors_by_stage": written["errors_by_stage"]}
    if plan.detector is not None:
        detect_keys = plan.tasks.filter(plan.tasks.column("needs_detection")).column("image_key").to_pylist()
        counts["images_without_detections"] = len(set(detect_keys) - written["image_keys"])
    manifest = {
        "job_id": plan.job_id,
        "name": spec.name,
        "status": "succeeded" if written["instances"] or not written["errors"] else "failed",
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "seconds": {"total": finished - started, "ray_start": ray_ready - started, "pipeline": pipeline_seconds},
        "throughput": {
            "crops_per_second": written["instances"] / pipeline_seconds if pipeline_seconds > 0 else 0.0,
            "images_per_second": plan.counts["images"] / pipeline_seconds if pipeline_seconds > 0 else 0.0,
        },
        "counts": counts,
        "experts": {
            name: {"model": e.model.model_id, "revision": e.model.revision, "dataset_index": e.dataset_index,
                   "keypoint_schema": e.keypoint_schema, "input_size": list(e.input_size)}
            for name, e in experts.items()
        },
        "routing": {"rules": plan.routing.rules, "default": plan.routing.default},
        "detector": {"model": plan.detector.model_id, "revision": plan.detector.revision} if plan.detector else None,
        "files": {"keypoints": written["keypoint_files"], "errors": written["error_files"]},
        "spec": spec.redacted(),
        "spec_fingerprint": spec.fingerprint(),
        "versions": _versions(),
    }
    writer.write_manifest(manifest)
    log.log(logging.INFO if manifest["status"] == "succeeded" else logging.ERROR,
            "job %s %s: %d images, %d instances, %d errors, %.1f crops/s -> %s", plan.job_id, manifest["status"],
            counts["images"], written["instances"], written["errors"],
            manifest["throughput"]["crops_per_second"], spec.output.path,
            extra={"event": "job_finished", "job_id": plan.job_id, "status": manifest["status"],
                   "images": counts["images"], "boxes": counts["boxes"], "instances": written["instances"],
                   "errors": written["errors"], "errors_by_stage": dict(written["errors_by_stage"]),
                   "crops_per_second": manifest["throughput"]["crops_per_second"],
                   "seconds": manifest["seconds"]["total"], "output": spec.output.path})
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
