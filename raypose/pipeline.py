"""The job: plan it (no Ray), build its Ray Dataset, run it into the writer.

Stage order lives here and only here:
    image tasks -> [DetectStage (Ray actors)] -> make_crops (Ray tasks, CPU)
                -> PoseStage (Ray actors) -> OutputWriter (driver)
resources.crop_in moves the crops: into PoseStage (pose_actor, the default on CPU), or onto
its device, with read_images as the CPU stage (pose_device).
"""

from __future__ import annotations

import logging
import math
import platform
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from raypose import __version__
from raypose.boxes import BoxSet, attach_boxes, inline_boxes, load_boxes
from raypose.crops import make_crops
from raypose.detector import DetectorInfo, DetectStage, inspect_detector
from raypose.errors import JobFailed, SpecError
from raypose.faults import fault_env
from raypose.keypoint_schemas import SCHEMAS
from raypose.pose import PoseStage, cpu_pose_actors, cpu_pose_threads, default_batch_size
from raypose.reader import list_images, read_images
from raypose.routing import Routing, resolve_routing
from raypose.spec import JobSpec
from raypose.writer import JOB_FILE, OutputStore, ShardWriter, keys_fingerprint, shard_of

log = logging.getLogger(__name__)


@dataclass
class JobPlan:
    """A validated job with its inputs resolved: everything known before Ray starts."""

    spec: JobSpec
    job_id: str
    routing: Routing
    detector: DetectorInfo | None  # when some images need detection
    tasks: pa.Table  # one row per image to process in this run (table.IMAGE_TASK_SCHEMA)
    missing: pa.Table  # errors for boxes whose image is not in storage
    counts: dict[str, int]
    store: OutputStore
    num_shards: int
    shard_images: dict[int, list[str]]  # the shards this run writes, and their image keys
    reused: dict[int, dict] = field(default_factory=dict)  # commit markers of shards earlier runs finished


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


def plan_job(spec: JobSpec, force: bool = False) -> JobPlan:
    """Check everything that can be checked without Ray: model configs, routing, inputs, boxes, output.

    With `output.mode: resume`, shards an earlier run committed for the same inputs are kept
    and left out of this run; a different spec or model is refused unless `force`.
    """
    routing = resolve_routing(spec.pose)
    detecting = spec.boxes.source == "detector" or spec.boxes.detect_missing
    detector = inspect_detector(spec.boxes.detector, spec.boxes.categories) if detecting else None
    store = OutputStore(spec.output, spec.output_storage_options())
    existing = store.existing_entries()
    if existing and spec.output.mode == "error":
        raise SpecError(
            f"output.path: {spec.output.path} already holds raypose output ({', '.join(existing)}); "
            "set output.mode: overwrite to replace it, resume to finish it, or choose another path"
        )
    models = _model_revisions(routing, detector)
    previous = store.read_json(JOB_FILE) if spec.output.mode == "resume" else None
    if previous is not None and not force:
        _check_same_job(previous, spec, models)
    store.check_writable()
    images = list_images(spec.images, spec.boxes)
    if spec.boxes.source == "detector":
        box_set = BoxSet(by_image={}, source="detector")
    elif spec.boxes.source == "inline":
        box_set = inline_boxes(images, spec.boxes)
    else:
        box_set = load_boxes(spec.boxes, spec.boxes_storage_options())
    tasks, missing, counts = attach_boxes(images, box_set, detect_missing=detecting)
    if not counts["boxes"] and not counts["boxes_without_image"] and not counts["images_to_detect"]:
        raise SpecError(
            f"boxes: no box to label: {counts['boxes_dropped_by_filters']} were dropped by the filters "
            f"(boxes.categories {spec.boxes.categories}, min_area {spec.boxes.min_area}, "
            f"min_score {spec.boxes.min_score}, include_crowd {spec.boxes.include_crowd})"
        )
    if previous is not None:
        job_id, num_shards = previous["job_id"], int(previous["num_shards"])
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        job_id = f"{spec.name}-{stamp}-{uuid.uuid4().hex[:6]}"
        num_shards = max(1, math.ceil(tasks.num_rows / spec.output.images_per_shard))
    keys = tasks.column("image_key").to_pylist()
    shards = [shard_of(key, num_shards) for key in keys]
    tasks = tasks.set_column(tasks.schema.get_field_index("shard"), "shard", pa.array(shards, pa.int32()))
    shard_images: dict[int, list[str]] = {shard: [] for shard in range(num_shards)}
    for key, shard in zip(keys, shards):
        shard_images[shard].append(key)
    reused = {}
    if previous is not None:
        for shard, marker in store.committed_shards().items():
            if shard in shard_images and marker["inputs"] == keys_fingerprint(shard_images[shard]):
                reused[shard] = marker
                del shard_images[shard]
        tasks = tasks.filter(pa.array([shard not in reused for shard in shards]))
    return JobPlan(
        spec=spec, job_id=job_id, routing=routing, detector=detector, tasks=tasks, missing=missing,
        counts=counts, store=store, num_shards=num_shards, shard_images=shard_images, reused=reused,
    )


def _model_revisions(routing: Routing, detector: DetectorInfo | None) -> dict[str, str | None]:
    models = {f"expert:{name}": f"{e.model.model_id}@{e.model.revision}" for name, e in routing.experts.items()}
    if detector is not None:
        models["detector"] = f"{detector.model_id}@{detector.revision}"
    return models


def _check_same_job(previous: dict, spec: JobSpec, models: dict) -> None:
    if previous.get("result_fingerprint") != spec.result_fingerprint():
        raise SpecError(
            f"output.mode: resume: the output at {spec.output.path} was made from a different spec "
            f"(fingerprint {previous.get('result_fingerprint')} vs {spec.result_fingerprint()}); "
            "use output.mode: overwrite, another output.path, or --force to resume anyway"
        )
    if previous.get("models") != models:
        raise SpecError(
            f"output.mode: resume: the output at {spec.output.path} was made with other models "
            f"({previous.get('models')} vs {models}); use --force to resume anyway"
        )


def build_pose_dataset(plan: JobPlan, gpus_in_cluster: float = 0.0):
    """The Ray Dataset of pose rows (table.POSE_OUTPUT_SCHEMA) for a planned job."""
    import ray.data

    spec, resources = plan.spec, plan.spec.resources
    # Dead workers are retried (tasks re-run, actors restart and retry), at most max_retries times;
    # Ray Data's own default for actor pools is to retry forever, which a poison batch would.
    # Ray 2.60 has no named parameter for retries and warns that ray_remote_args will go (2.64):
    # the warning is silenced here, where raypose knows the reason; revisit when upgrading.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    retries = spec.limits.max_retries
    task_retries = {"max_retries": retries, **_runtime_env()}
    actor_retries = {"max_restarts": retries, "max_task_retries": retries, **_runtime_env()}
    per_task = resources.images_per_crop_task
    blocks = [plan.tasks.slice(i, per_task) for i in range(0, plan.tasks.num_rows, per_task)]
    # from_arrow runs a Ray task per block for its metadata, on the workers the pose actor could
    # start in: from_blocks reads it here (first crop 5.5-5.8 -> 4.7-4.9 s after the pipeline's
    # start, 32 images on 2 cores) and keeps the blocks as they are.
    dataset = ray.data.from_blocks(blocks)
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
                "image_column": spec.images.image_column,
            },
            batch_size=spec.boxes.detector.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=resources.detector_actors),
            num_cpus=resources.cpus_per_detector_actor,
            num_gpus=gpus,
            **actor_retries,
        )
    routing = plan.routing
    crop_options = {
        "input_sizes": {name: expert.input_size for name, expert in routing.experts.items()},
        "routes": routing.rules,
        "default_expert": routing.default,
        "storage_options": dict(spec.images.storage_options),
        "max_pixels": spec.images.max_pixels,
        "jpeg_draft": spec.images.jpeg_draft,
        "image_column": spec.images.image_column,
    }
    gpus, device = _accelerator(resources.gpus_per_pose_actor, spec.pose.device, gpus_in_cluster)
    on_cpu = device == "cpu"
    crop_in, actors, threads = pose_actor_layout(resources, on_cpu, _smallest_node_cpus() if on_cpu else 0, len(blocks),
                                                 detector=plan.detector is not None)
    if crop_in == "tasks":
        dataset = dataset.map_batches(
            make_crops, batch_size=None, batch_format="pyarrow", fn_kwargs=crop_options, num_cpus=1, **task_retries,
        )
    elif crop_in == "pose_device":
        read_options = {name: crop_options[name] for name in ("storage_options", "image_column")}
        dataset = dataset.map_batches(
            read_images, batch_size=None, batch_format="pyarrow", fn_kwargs=read_options, num_cpus=1, **task_retries,
        )
        crop_options.pop("jpeg_draft")  # refused with pose_device (spec.cross_field_problems)
    batch_size = spec.pose.batch_size or default_batch_size(on_gpu=not on_cpu)
    return dataset.map_batches(
        PoseStage,
        fn_constructor_kwargs={
            "routing": routing,
            "device": device,
            "dtype": spec.pose.dtype,
            "flip_test": spec.pose.flip_test,
            "compile": spec.pose.compile,
            "num_threads": threads,
            "batch_size": batch_size,
            "crop_in": crop_in,
            "crop_options": crop_options,
        },
        # Crop rows come pose.batch_size at a time. An actor that crops on the CPU takes a crop
        # task's block (resources.images_per_crop_task images); one that crops on its device
        # takes pose.batch_size images, so that its forwards are full.
        batch_size={"tasks": batch_size, "pose_actor": None, "pose_device": batch_size}[crop_in],
        batch_format="pyarrow",
        compute=_pose_actor_pool(actors, resources.pose_calls_per_actor),
        num_cpus=resources.cpus_per_pose_actor,
        num_gpus=gpus,
        **actor_retries,
    )


def pose_actor_layout(resources, on_cpu: bool, node_cpus: int, blocks: int,
                      detector: bool = False) -> tuple[str, int, int | None]:
    """Where the crops are made, how many pose actors, and each one's torch threads (None: on a GPU),
    for a job of `blocks` image blocks, with or without a detector stage."""
    crop_in = resources.crop_in
    if crop_in == "auto":
        # On CPU the forward pass takes every core it is given: crop tasks beside it only stall
        # its threads, while cropping in turn with the forwards costs just the crop time
        # (benchmarks/README.md).
        crop_in = "pose_actor" if on_cpu else "tasks"
    actors = resources.pose_actors
    if actors is None:
        # Two CPU actors that crop for themselves crop while the other runs its forwards (no more
        # than there are blocks to give them); crop or read tasks, or a detector, need CPUs of
        # their own, so beside them one actor.
        two = on_cpu and crop_in == "pose_actor" and not detector
        actors = max(1, min(cpu_pose_actors(node_cpus), blocks)) if two else 1
    threads = (resources.threads_per_pose_actor or cpu_pose_threads(node_cpus, actors)) if on_cpu else None
    return crop_in, actors, threads


def _pose_actor_pool(actors: int, calls: int):
    """The pose stage's fixed pool; with calls > 1 each actor runs that many calls in threads
    (PoseStage lets one forward run at a time)."""
    import ray.data

    if calls == 1:
        return ray.data.ActorPoolStrategy(size=actors)
    return ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True)


def _runtime_env() -> dict:
    env = fault_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def _smallest_node_cpus() -> int:
    """The CPU count of the smallest node with CPUs: what a pose actor can count on wherever it lands."""
    import ray

    cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    return min((c for c in cpus if c > 0), default=1)


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

    spec, store = plan.spec, plan.store
    started = time.time()
    if not ray.is_initialized():
        ray.init(num_cpus=spec.resources.num_cpus, include_dashboard=False, log_to_driver=False)
    ray_ready = time.time()
    if spec.output.mode == "overwrite":
        store.clear()
    for shard in plan.shard_images:  # what an interrupted run may have left of unfinished shards
        store.remove_shard(shard)
    models = _model_revisions(plan.routing, plan.detector)
    store.write_json(JOB_FILE, {
        "job_id": plan.job_id, "num_shards": plan.num_shards, "models": models,
        "result_fingerprint": spec.result_fingerprint(), "spec": spec.redacted(),
    })
    experts = plan.routing.experts
    writer = ShardWriter(
        store,
        job_id=plan.job_id,
        models={name: (e.model.model_id, e.model.revision) for name, e in experts.items()},
        schemas=[SCHEMAS[name] for name in sorted({e.keypoint_schema for e in experts.values()})],
        shard_images=plan.shard_images,
    )
    writer.write_listing_errors(plan.missing)
    log.info("job %s started: %d images, %d boxes, %d to detect, %d of %d shards to do -> %s", plan.job_id,
             plan.counts["images"], plan.counts["boxes"], plan.counts["images_to_detect"], len(plan.shard_images),
             plan.num_shards, spec.output.path,
             extra={"event": "job_started", "job_id": plan.job_id, "images": plan.counts["images"],
                    "boxes": plan.counts["boxes"], "images_to_detect": plan.counts["images_to_detect"],
                    "shards": plan.num_shards, "shards_to_do": len(plan.shard_images), "output": spec.output.path})
    if plan.tasks.num_rows:
        dataset = build_pose_dataset(plan, ray.cluster_resources().get("GPU", 0.0))
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.write(batch)
    committed = writer.close()
    finished = time.time()
    pipeline_seconds = finished - ray_ready
    markers = {**plan.reused, **committed}
    instances = sum(m["instances"] for m in markers.values())
    errors_by_stage = Counter(plan.missing.column("stage").to_pylist())
    for marker in markers.values():
        errors_by_stage.update(marker["errors_by_stage"])
    errors = sum(errors_by_stage.values())
    counts = {**plan.counts, "instances": instances, "errors": errors, "errors_by_stage": dict(errors_by_stage),
              "instances_this_run": sum(m["instances"] for m in committed.values())}
    if plan.detector is not None:
        counts["images_without_detections"] = sum(m["images_without_boxes"] for m in markers.values())
    errored_fraction = errors / max(1, errors + instances)
    status = "succeeded"
    if not instances and errors:
        status, problem = "failed", "every input failed"
    elif errored_fraction > spec.limits.max_errored_fraction:
        status = "failed"
        problem = f"{errored_fraction:.1%} of the rows failed, above limits.max_errored_fraction ({spec.limits.max_errored_fraction:.1%})"
    manifest = {
        "job_id": plan.job_id,
        "name": spec.name,
        "status": status,
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "seconds": {"total": finished - started, "ray_start": ray_ready - started, "pipeline": pipeline_seconds},
        "throughput": {
            "crops_per_second": counts["instances_this_run"] / pipeline_seconds if pipeline_seconds > 0 else 0.0,
            "images_per_second": plan.tasks.num_rows / pipeline_seconds if pipeline_seconds > 0 else 0.0,
        },
        "counts": counts,
        "shards": {"total": plan.num_shards, "reused": len(plan.reused), "written": len(committed)},
        "experts": {
            name: {"model": e.model.model_id, "revision": e.model.revision, "dataset_index": e.dataset_index,
                   "keypoint_schema": e.keypoint_schema, "input_size": list(e.input_size)}
            for name, e in experts.items()
        },
        "routing": {"rules": plan.routing.rules, "default": plan.routing.default},
        "detector": {"model": plan.detector.model_id, "revision": plan.detector.revision} if plan.detector else None,
        "files": {
            "keypoints": sorted(f for m in markers.values() for f in m["files"] if "/keypoints/" in f),
            "errors": sorted(f for m in markers.values() for f in m["files"] if "/errors/" in f),
        },
        "spec": spec.redacted(),
        "spec_fingerprint": spec.fingerprint(),
        "result_fingerprint": spec.result_fingerprint(),
        "versions": _versions(),
    }
    store.finish(manifest)
    log.log(logging.INFO if status == "succeeded" else logging.ERROR,
            "job %s %s: %d images, %d instances, %d errors, %.1f crops/s -> %s", plan.job_id, status,
            counts["images"], instances, errors, manifest["throughput"]["crops_per_second"], spec.output.path,
            extra={"event": "job_finished", "job_id": plan.job_id, "status": status,
                   "images": counts["images"], "boxes": counts["boxes"], "instances": instances,
                   "errors": errors, "errors_by_stage": dict(errors_by_stage),
                   "crops_per_second": manifest["throughput"]["crops_per_second"],
                   "seconds": manifest["seconds"]["total"], "output": spec.output.path})
    result = JobResult(
        job_id=plan.job_id, output_path=spec.output.path, counts=counts, seconds=manifest["seconds"], manifest=manifest,
    )
    if status == "failed":
        raise JobFailed(f"job {plan.job_id}: {problem} ({errors} errors, {dict(errors_by_stage)}); see {spec.output.path}/errors/")
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
