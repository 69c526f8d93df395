"""The run: a planned job on Ray, from the layout to the last shard's commit and the manifest."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from raypose.errors import JobFailed, RayposeError
from raypose.imaging.keypoint_schemas import SCHEMAS
from raypose.output.resume import check_resumable, finish_run, result_key, start_run
from raypose.output.tracks import link_shard_tracks
from raypose.output.writer import PartTarget, ShardWriter
from raypose.pipeline.build import build_dataset
from raypose.pipeline.layout import Layout, resolve_layout
from raypose.pipeline.manifest import job_manifest
from raypose.pipeline.plan import JobPlan
from raypose.pipeline.progress import Progress
from raypose.pipeline.runtime import start_ray
from raypose.pipeline.stages import Stage

log = logging.getLogger(__name__)


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


def run_job(plan: JobPlan, wrap: Callable[[Stage], Stage] | None = None, progress: Progress | None = None) -> JobResult:
    """Run a planned job on the Ray cluster this process uses (an embedded one if none).

    `wrap` may replace stages (the benchmark traces them); `progress` reports as the rows come in.
    """
    if plan.lease is None:
        raise ValueError("run_job takes a plan made to run: plan_job(spec, run=True) (it holds the output's lease)")
    try:
        return _run(plan, wrap, progress)
    finally:
        plan.close()


def _run(plan: JobPlan, wrap: Callable[[Stage], Stage] | None, progress: Progress | None) -> JobResult:
    started = plan.started or time.time()
    cluster = start_ray(plan.spec.resources)
    layout = resolve_layout(plan.spec, plan.routing, cluster, plan.images, detecting=plan.detector is not None)
    key = result_key(plan.spec, plan.models(), resolved_settings(layout))
    if plan.previous is not None and plan.spec.output.mode in ("resume", "append") and not plan.force:
        check_resumable(plan.previous, key, plan.spec.output.path, plan.spec.output.mode)
    ray_ready = time.time()
    progress = progress or Progress(plan.images, "off")
    writer = _start_writer(plan, key, started, progress.shard_committed)
    _log_started(plan, layout)
    progress.start()
    try:
        if plan.images:
            for summaries in build_dataset(plan, layout, writer.target, wrap).iter_batches(batch_size=None,
                                                                                         batch_format="pyarrow"):
                writer.take(summaries)
                progress.update(writer.images_done, writer.instances, writer.errors)
    except RayposeError:
        raise
    except Exception as exc:  # the pipeline stopped (workers that died past their retries): one line, kept shards
        raise pipeline_failure(exc, plan.spec.limits.max_retries) from exc
    finally:
        progress.finish()
    committed = writer.close()
    manifest = job_manifest(plan, layout, committed, key,
                            {"started": started, "ray_ready": ray_ready, "finished": time.time()},
                            writer.crops_by_worker)
    plan.lease.check()
    manifest["runs"] = finish_run(plan.store, manifest)
    plan.store.finish(manifest)
    _log_finished(plan, manifest)
    if manifest["status"] == "failed":
        c = manifest["counts"]
        raise JobFailed(f"job {plan.job_id}: {manifest['problem']} ({c['errors']} errors, {c['errors_by_stage']}); "
                        f"see {plan.spec.output.path}/errors/")
    return JobResult(job_id=plan.job_id, output_path=plan.spec.output.path, counts=manifest["counts"],
                     seconds=manifest["seconds"], manifest=manifest)


def pipeline_failure(exc: Exception, retries: int) -> JobFailed:
    """What stopped the Dataset, as one line: the line of a raypose error a task raised (a write task's
    `output.path: cannot write ...` when the disk fills or permissions go), else the stage, how often it
    died, and Ray's reason."""
    import ray.exceptions

    raw = str(getattr(exc, "error_msg", None) or exc)
    raised = RAYPOSE_ERROR_LINE.findall(raw)  # a task's error reaches the driver as its traceback's text
    if raised:
        return JobFailed(raised[-1].strip())  # the last: the outermost, raised on purpose
    text = " ".join(raw.split())
    found = re.search(r"MapWorker\(MapBatches\((\w+)\)\)|MapBatches\((\w+)\)", text)
    stage = STAGE_NAMES.get(next((g for g in found.groups() if g), ""), "pipeline") if found else "pipeline"
    because = re.search(r"The actor is dead because (.*?)(?: Some common causes|\s*class_name:|$)", text)
    cause = (because.group(1) if because else text.split(". ")[0]).strip().rstrip(".")
    kept = "committed shards are kept: rerun with --resume"
    if isinstance(exc, ray.exceptions.RayActorError):
        return JobFailed(f"{stage} stage: actor died {retries + 1} times: {cause}; {kept}")
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return JobFailed(f"{stage} stage: a task's worker died {retries + 1} times: {cause}; {kept}")
    return JobFailed(f"{stage} stage: {type(exc).__name__}: {cause[:300]}; {kept}")


# "raypose.errors.JobFailed: output.path: cannot write ...", as a task's traceback ends when raypose raised it.
RAYPOSE_ERROR_LINE = re.compile(r"^raypose\.errors\.\w+: (.+)$", re.MULTILINE)
# Stage callables as Ray names them in its errors -> raypose's stage names.
STAGE_NAMES = {"PoseStage": "pose", "DetectStage": "detect", "make_crops": "crop", "make_crops_in_parts": "crop",
               "plan_crops": "crop", "read_frames": "video", "write_parts": "write"}


def resolved_settings(layout: Layout) -> dict[str, Any]:
    """What the layout resolved that changes the rows: the result key's `layout.*` entries."""
    settings = {"pose_device": layout.pose.device, "pose_dtype": layout.pose.dtype, "decoder": layout.crops.decoder}
    # The flip columns never change the keypoints. Keyed only when on: a resume that turns them on
    # is refused (earlier rows have none), and outputs made before they existed still resume.
    if layout.pose.flip_uncertainty:
        settings["flip_uncertainty"] = True
    if layout.detector_pool is not None:
        settings.update(detector_device=layout.detector_device, detector_dtype=layout.detector_dtype)
    return settings


def _start_writer(plan: JobPlan, key: dict[str, Any], started: float,
                  on_commit: Callable[[dict], None]) -> ShardWriter:
    start_run(plan.store, plan.spec, plan.shards, key, plan.previous, started)
    experts = plan.routing.experts
    target = PartTarget(
        output=plan.spec.output, storage_options=plan.spec.output_storage_options(), job_id=plan.job_id,
        models={name: (e.model.model_id, e.model.revision) for name, e in experts.items()},
        schemas={name: SCHEMAS[name].describe() for name in sorted({e.keypoint_schema for e in experts.values()})},
    )
    writer = ShardWriter(plan.store, target, shards=plan.shards.to_write, on_commit=on_commit,
                         before_commit=plan.lease.check,
                         finish_parts=link_shard_tracks if plan.spec.pose.track else None)
    writer.write_listing_errors(plan.missing)
    return writer


def _log_started(plan: JobPlan, layout: Layout) -> None:
    c, shards = plan.counts, plan.shards
    log.info("job %s started: %d images, %d boxes, %d to detect, %d of %d shards to do -> %s", plan.job_id,
             c["images"], c["boxes"], c["images_to_detect"], len(shards.to_write), shards.num_shards,
             plan.spec.output.path,
             extra={"event": "job_started", "job_id": plan.job_id, "images": c["images"], "boxes": c["boxes"],
                    "images_to_detect": c["images_to_detect"], "shards": shards.num_shards,
                    "shards_to_do": len(shards.to_write), "output": plan.spec.output.path,
                    "layout": layout.describe()})


def _log_finished(plan: JobPlan, manifest: dict[str, Any]) -> None:
    c, status = manifest["counts"], manifest["status"]
    rate = manifest["throughput"]["crops_per_second"]
    log.log(logging.INFO if status == "succeeded" else logging.ERROR,
            "job %s %s: %d images, %d instances, %d errors, %.1f crops/s -> %s", plan.job_id, status,
            c["images"], c["instances"], c["errors"], rate, plan.spec.output.path,
            extra={"event": "job_finished", "job_id": plan.job_id, "status": status, "images": c["images"],
                   "boxes": c["boxes"], "instances": c["instances"], "errors": c["errors"],
                   "errors_by_stage": c["errors_by_stage"], "crops_per_second": rate,
                   "seconds": manifest["seconds"]["total"], "output": plan.spec.output.path})
