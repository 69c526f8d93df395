"""The plan: everything about a job that can be known and checked without Ray.

Model configs and routing, the detector, the output path, the listing, the boxes and the
image tasks, and (with `output.mode: resume`) the shards an earlier run already committed.
`raypose validate` and `raypose submit` run this same plan.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypose.config.spec import JobSpec
from raypose.errors import SpecError
from raypose.inputs.boxes import BoxSet, attach_boxes, inline_boxes, load_boxes
from raypose.inputs.listing import list_images
from raypose.inputs.storage import uri_of
from raypose.output.lease import Lease
from raypose.output.resume import ShardPlan, check_resumable, plan_shards, result_key
from raypose.output.writer import JOB_FILE, OutputStore

if TYPE_CHECKING:
    from raypose.models.detector import DetectorInfo
    from raypose.models.routing import Routing


@dataclass
class JobPlan:
    """A validated job with its inputs resolved: everything known before Ray starts."""

    spec: JobSpec
    routing: Routing
    detector: DetectorInfo | None  # when some images need detection
    tasks: pa.Table  # one row per image to process in this run (schema.IMAGE_TASK_SCHEMA)
    missing: pa.Table  # errors for boxes whose image is not in storage
    counts: dict[str, int]
    store: OutputStore
    shards: ShardPlan
    previous: dict[str, Any] | None  # the _job.json of the run this one resumes
    force: bool = False  # resume even if the settings changed
    lease: Lease | None = None  # held from the plan to the run's end (None: a plan to check, not to run)

    def close(self) -> None:
        """Give the output's lease back (run_job does at its end)."""
        if self.lease is not None:
            self.lease.release()

    @property
    def job_id(self) -> str:
        return self.shards.job_id

    def models(self) -> dict[str, str]:
        return model_revisions(self.routing, self.detector)


def model_revisions(routing: Routing, detector: DetectorInfo | None) -> dict[str, str]:
    """Each expert's and the detector's `model@revision`: part of the result key."""
    models = {f"expert:{name}": f"{e.model.model_id}@{e.model.revision}" for name, e in routing.experts.items()}
    if detector is not None:
        models["detector"] = f"{detector.model_id}@{detector.revision}"
    return models


def plan_job(spec: JobSpec, force: bool = False, *, run: bool = False, break_lease: bool = False) -> JobPlan:
    """Check everything that can be checked without Ray: model configs, routing, inputs, boxes, output.

    With `output.mode: resume`, shards an earlier run committed for the same inputs are kept
    and left out of this run; other settings are refused unless `force`. With `run`, the plan
    is for a run: it takes the output's lease first (`output/lease.py`; `break_lease` takes it
    from a holder that still seems alive) and holds it until `run_job` ends or `close()`;
    without, it writes nothing and fails if another run holds the output.
    """
    detecting = spec.boxes.source == "detector" or spec.boxes.detect_missing
    # The model checks are mostly imports (Python, holding the GIL); the listing and the box join are
    # Arrow work that releases it: run side by side, a plan of millions of images takes the longer of the two.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="raypose-plan-models") as pool:
        models = pool.submit(_models, spec, detecting)
        lease = None
        try:
            store = OutputStore(spec.output, spec.output_storage_options())
            lease = _hold_output(spec, store, run, break_lease)
            previous = _previous_run(spec, store)
            store.check_writable()
            tasks, missing, counts = _image_tasks(spec, detecting)  # sorted by key: shard by shard, each commits soon
            if spec.output.mode == "overwrite":
                _check_images_outside(spec, store, tasks)
        except BaseException:
            if lease is not None:
                lease.release()
            models.result()  # a model's problem is reported first, as when the models were checked first
            raise
        try:
            routing, detector = models.result()
            if previous is not None and not force:
                check_resumable(previous, result_key(spec, model_revisions(routing, detector)), spec.output.path)
            shards = plan_shards(spec, tasks.column("image_key"), store, previous)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
    if lease is not None:
        lease.name(shards.job_id)
    tasks = tasks.set_column(tasks.schema.get_field_index("shard"), "shard", pa.array(shards.shard_of_task, pa.int32()))
    if shards.reused:
        tasks = tasks.filter(pa.array(~np.isin(shards.shard_of_task, list(shards.reused))))
    return JobPlan(spec=spec, routing=routing, detector=detector, tasks=tasks, missing=missing, counts=counts,
                   store=store, shards=shards, previous=previous, force=force, lease=lease)


def _hold_output(spec: JobSpec, store: OutputStore, run: bool, break_lease: bool) -> Lease | None:
    """A run's lease on the output (taken before anything is read or written there); a check's look at it."""
    lease = Lease(store.fs, store.root, job_id="(planning)", output_url=spec.output.path)
    if run:
        return lease.acquire(break_lease)
    holder = lease.holder()
    if holder is not None and holder.stale_because(time.time()) is None:
        lease.acquire()  # raises LeaseHeld naming the holder, as a run would
    return None


def _check_images_outside(spec: JobSpec, store: OutputStore, tasks: pa.Table) -> None:
    """Refuse to overwrite an output that holds the images (or their tars, Parquet files) the job reads."""
    root = store.root.rstrip("/") + "/"
    uris = tasks.column("container") if tasks.num_rows and tasks.column("container").null_count == 0 \
        else tasks.column("image_uri")
    prefix = uri_of(store.fs, root)
    inside = pc.any(pc.starts_with(pc.fill_null(uris, ""), prefix)).as_py() if len(uris) else False
    if inside:
        raise SpecError(f"output.mode: overwrite, but images.path ({spec.images.path}) is inside output.path "
                        f"({spec.output.path}): overwriting could remove the images; write the output elsewhere")


def _models(spec: JobSpec, detecting: bool) -> tuple[Routing, DetectorInfo | None]:
    """The pose experts' routing and, when some images need detection, the detector: configs and weights checked."""
    # Imported here, in the plan's second thread: torch and transformers are most of what these checks cost.
    from raypose.models.detector import inspect_detector
    from raypose.models.routing import resolve_routing

    routing = resolve_routing(spec.pose)
    return routing, inspect_detector(spec.boxes.detector, spec.boxes.categories) if detecting else None


def _previous_run(spec: JobSpec, store: OutputStore) -> dict[str, Any] | None:
    """The _job.json an earlier run left, when this run resumes it; refuses an output that is not to be touched."""
    existing = store.existing_entries()
    if existing and spec.output.mode == "error":
        raise SpecError(
            f"output.path: {spec.output.path} already holds raypose output ({', '.join(existing)}); "
            "set output.mode: overwrite to replace it, resume to finish it, or choose another path"
        )
    return store.read_json(JOB_FILE) if spec.output.mode == "resume" else None


def _image_tasks(spec: JobSpec, detecting: bool) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """The listed images joined with their boxes: image tasks, listing errors and counts."""
    images = list_images(spec.images, spec.boxes)
    _release_unused()
    if spec.boxes.source == "detector":
        box_set = BoxSet.empty("detector")
    elif spec.boxes.source == "inline":
        box_set = inline_boxes(images, spec.boxes)
    else:
        box_set = load_boxes(spec.boxes, spec.boxes_storage_options())
    _release_unused()
    if spec.images.format == "video":  # each video's sampled frames are its images
        from raypose.inputs.video import video_tasks

        tasks, missing, counts = video_tasks(images, spec.images, box_set, detecting)
    else:
        tasks, missing, counts = attach_boxes(images, box_set, detect_missing=detecting)
    if not (counts["boxes"] or counts["boxes_without_image"] or counts["images_to_detect"] or counts.get("videos_failed")):
        raise SpecError(
            f"boxes: no box to label: {counts['boxes_dropped_by_filters']} were dropped by the filters "
            f"(boxes.categories {spec.boxes.categories}, min_area {spec.boxes.min_area}, "
            f"min_score {spec.boxes.min_score}, include_crowd {spec.boxes.include_crowd})"
        )
    return tasks, missing, counts


def _release_unused() -> None:
    # Arrow's allocator keeps freed memory for reuse; a plan's steps each leave gigabytes' worth
    # of freed intermediates at millions of images, which would add up to its peak RSS.
    pa.default_memory_pool().release_unused()
