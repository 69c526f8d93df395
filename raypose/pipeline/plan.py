"""The plan: everything about a job that can be known and checked without Ray.

Model configs and routing, the detector, the output path and what earlier runs left there, the
listing, the boxes, and the shards this run labels (`output/resume.py` decides which). A plan
made to run (`run=True`, `raypose submit`) holds the output's lease and writes each shard's
image tasks to `_plan/` as it is cut; a plan made to check (`raypose validate`) writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from raypose.config.spec import JobSpec
from raypose.errors import SpecError
from raypose.inputs.arrays import NotSorted
from raypose.inputs.boxes import BoxJoin, BoxSet, BoxStream, inline_boxes, open_boxes
from raypose.inputs.listing import iter_images, list_images
from raypose.inputs.storage import uri_of
from raypose.inputs.video import frame_tasks, video_counts
from raypose.output.lease import PLANNING, Lease
from raypose.output.resume import (
    OutputState,
    ShardCutter,
    ShardPlan,
    check_layout,
    check_resumable,
    job_id_for,
    result_key,
)
from raypose.output.writer import PLAN_DIR, TMP_DIR, OutputStore

if TYPE_CHECKING:
    from raypose.models.detector import DetectorInfo
    from raypose.models.routing import Routing

# Image tasks the plan hands the shard cutter at a time.
CHUNK_ROWS = 1 << 16


@dataclass
class JobPlan:
    """A validated job with its inputs resolved: everything known before Ray starts."""

    spec: JobSpec
    routing: Routing
    detector: DetectorInfo | None  # when some images need detection
    missing: pa.Table  # errors for boxes whose image is not in storage, and names listing could not take as images
    counts: dict[str, int]
    store: OutputStore
    shards: ShardPlan
    previous: dict[str, Any] | None  # the _job.json of the output's last run
    force: bool = False  # resume or append even if the settings changed
    lease: Lease | None = None  # held from the plan to the run's end (None: a plan to check, not to run)
    started: float = 0.0

    def close(self) -> None:
        """Give the output's lease back (run_job does at its end)."""
        if self.lease is not None:
            self.lease.release()

    @property
    def job_id(self) -> str:
        return self.shards.job_id

    @property
    def images(self) -> int:
        """Image tasks this run labels."""
        return self.shards.images

    def plan_files(self) -> list[str]:
        """The `_plan/` files of the shards this run writes (a plan made to run has written them)."""
        return self.shards.plan_files(self.store)

    def read_tasks(self) -> pa.Table:
        """This run's image tasks, read back from its plan files (for tests and benchmarks of small jobs)."""
        tables = [self.store.read_parquet(path) for path in self.plan_files()]
        return pa.concat_tables(tables) if tables else pa.table({})

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

    With `output.mode` resume or append, images that committed shards hold with the same inputs
    are left out (`output/resume.py`), and changed settings are refused unless `force`. With
    `run`, the plan is for a run: it takes the output's lease first (`output/lease.py`;
    `break_lease` takes it from a holder that still seems alive), streams the listing and the
    boxes in key order, writing each shard's plan file as it is cut, and holds the lease until
    `run_job` ends or `close()`. Without, it writes nothing, fails if another run holds the
    output, and looks at the first chunk of the listing only (`counts["listing_complete"]` says
    whether that was all of it).
    """
    started = time.time()
    detecting = spec.boxes.detects
    # The model checks are mostly imports (Python, holding the GIL); the listing and the box join are
    # Arrow work that releases it: run side by side, a plan of millions of images takes the longer of the two.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="raypose-plan-models") as pool:
        models = pool.submit(check_models, spec, detecting)
        lease = None
        try:
            store = OutputStore(spec.output, spec.output_storage_options())
            lease = _hold_output(spec, store, run, break_lease)
            state = _output_state(spec, store)
            store.check_writable()
            listing = iter_images(spec.images, spec.boxes, CHUNK_ROWS)
            first = next(listing)  # the listing's problems are found before the models' are waited for
        except BaseException:
            if lease is not None:
                lease.release()
            models.result()  # a model's problem is reported first, as when the models were checked first
            raise
        try:
            routing, detector = models.result()
            if state.previous is not None and spec.output.mode in ("resume", "append") and not force:
                check_resumable(state.previous, result_key(spec, model_revisions(routing, detector)),
                                spec.output.path, spec.output.mode)
            try:
                shards, missing, counts = _cut_shards(spec, store, state, detecting, run, first, listing)
            except NotSorted:  # a manifest or box table sorted at first and not later: read whole, cut again
                shards, missing, counts = _cut_shards(spec, store, state, detecting, run, None,
                                                      iter(_whole_listing(spec)), stream=False)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
    if lease is not None:
        lease.name(shards.job_id)
    counts.update(images=shards.images, images_kept=shards.kept,
                  images_superseded=sum(len(keys) for keys in shards.superseded.values()), **listing.counts)
    missing = pa.concat_tables([listing.errors, missing])  # names the listing could not take as images, first
    return JobPlan(spec=spec, routing=routing, detector=detector, missing=missing, counts=counts, store=store,
                   shards=shards, previous=state.previous, force=force, lease=lease, started=started)


def check_models(spec: JobSpec, detecting: bool) -> tuple[Routing, DetectorInfo | None]:
    """The pose experts' routing and, when some images need detection, the detector: configs and weights checked."""
    # Imported here, in the plan's second thread: torch and transformers are most of what these checks cost.
    from raypose.models.detector import inspect_detector
    from raypose.models.routing import resolve_routing

    routing = resolve_routing(spec.pose)
    return routing, inspect_detector(spec.boxes.detector, spec.boxes.categories) if detecting else None


def _hold_output(spec: JobSpec, store: OutputStore, run: bool, break_lease: bool) -> Lease | None:
    """A run's lease on the output (taken before anything is read or written there); a check's look at it."""
    lease = Lease(store.fs, store.root, job_id=PLANNING, output_url=spec.output.path)
    if run:
        return lease.acquire(break_lease)
    holder = lease.current()
    if holder is not None and holder.stale_because(time.time()) is None:
        lease.acquire()  # raises LeaseHeld naming the holder, as a run would
    return None


def _output_state(spec: JobSpec, store: OutputStore) -> OutputState:
    """What earlier runs left at the output path, as this run's mode sees it; refuses an output not to be touched."""
    existing = store.existing_entries()
    foreign = store.foreign_files() if existing else []
    if foreign:
        raise SpecError(f"output.path: {spec.output.path} holds {', '.join(foreign)} that raypose did not write; "
                        "raypose writes its own there: move them, or choose another output.path")
    mode = spec.output.mode
    # A run planned and stopped before its first shard (Ray did not start, say) leaves only plan files: not output.
    unfinished_plan_only = existing and set(existing) <= {PLAN_DIR, TMP_DIR}
    if existing and mode == "error" and not unfinished_plan_only:
        raise SpecError(
            f"output.path: {spec.output.path} already holds raypose output ({', '.join(existing)}); "
            "set output.mode: append to add what is new, resume to finish an interrupted run, overwrite to "
            "replace it, or choose another path"
        )
    if mode == "overwrite" or not existing:
        return OutputState(previous=None, committed={}, leftovers=[])
    state = OutputState.read(store)
    if state.previous is not None:
        check_layout(state.previous, spec.output.path, mode)
    return state


def _cut_shards(spec: JobSpec, store: OutputStore, state: OutputState, detecting: bool, run: bool,
                first: pa.Table | None, listing: Iterator[pa.Table],
                stream: bool = True) -> tuple[ShardPlan, pa.Table, dict[str, Any]]:
    """The shards this run labels, cut from the listing joined with the boxes, a chunk at a time in key order.

    A run writes each shard's plan file as it is cut (after clearing what an overwrite replaces and what
    interrupted runs left); a check stops after the first chunk. Returns the plan, the errors of boxes whose
    image is not listed, and the counts.
    """
    boxes = _box_stream(spec, stream)
    join = BoxJoin(spec.boxes.source if spec.boxes.source != "coco" else "gt", detecting)
    cutter = ShardCutter(store, state, job_id_for(spec, state.previous), spec.output.images_per_shard, write=run,
                         whole_videos=spec.images.format == "video")
    missing = []
    videos: dict[str, int | None] = {}  # each video's frame count (None: it cannot be read)
    chunk = first if first is not None else next(listing)
    complete, prepared = True, not run
    while chunk is not None:
        following = next(listing, None)
        if following is not None and not run:
            complete = False  # a check looks at the first chunk only
        per_image = inline_boxes(chunk, spec.boxes).table if boxes is None else \
            boxes.until(None if following is None and complete else chunk.column("image_key")[-1].as_py())
        tasks, chunk_missing = join.chunk(chunk, per_image)
        if spec.images.format == "video":  # the listing is the sampled frames (inputs/video.py)
            tasks, chunk_missing = frame_tasks(tasks, chunk, chunk_missing)
            videos.update(video_counts(chunk))
        if spec.output.mode == "overwrite":
            _check_images_outside(spec, store, tasks)
        if not prepared:  # before the first plan file: what it replaces goes
            if spec.output.mode == "overwrite":
                store.clear()  # only raypose's own files: never the images
            state.clean(store)
            prepared = True
        cutter.add(tasks)
        missing.append(chunk_missing)
        chunk = following if complete else None
        _release_unused()
    counts: dict[str, Any] = dict(join.counts, listing_complete=complete)
    if spec.images.format == "video":
        counts.update(videos=len(videos), videos_failed=sum(1 for frames in videos.values() if frames is None))
    if boxes is not None:
        counts["boxes_dropped_by_filters"] = boxes.dropped
    if complete:
        join.check()
        if not counts["boxes"] and not counts["boxes_without_image"] and not counts["images_to_detect"]:
            raise SpecError(
                f"boxes: no box to label: {counts['boxes_dropped_by_filters']} were dropped by the filters "
                f"(boxes.categories {spec.boxes.categories}, min_area {spec.boxes.min_area}, "
                f"min_score {spec.boxes.min_score}, include_crowd {spec.boxes.include_crowd})"
            )
    return cutter.finish(), pa.concat_tables(missing), counts


def _box_stream(spec: JobSpec, stream: bool) -> BoxStream | None:
    """The job's boxes in key order (None: they come with each chunk of the listing, inline)."""
    if spec.boxes.source == "detector":
        return BoxStream.whole(BoxSet.empty("detector"))
    if spec.boxes.source == "inline":
        return None
    return open_boxes(spec.boxes, spec.boxes_storage_options(), stream)


def _whole_listing(spec: JobSpec) -> list[pa.Table]:
    table = list_images(spec.images, spec.boxes).images
    return [table.slice(start, CHUNK_ROWS) for start in range(0, table.num_rows, CHUNK_ROWS)]


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


def _release_unused() -> None:
    # Arrow's allocator keeps freed memory for reuse; a plan's steps each leave gigabytes' worth
    # of freed intermediates at millions of images, which would add up to its peak RSS.
    pa.default_memory_pool().release_unused()
