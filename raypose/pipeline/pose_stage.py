"""The pose stage: a Ray actor holding every checkpoint the routing uses, crop rows in, keypoint rows out."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import ContextManager

import numpy as np
import pyarrow as pa
import torch

from raypose.imaging.heatmaps import instance_scores
from raypose.imaging.keypoint_schemas import SCHEMAS
from raypose.imaging.uncertainty import flip_agreements, instance_doubts, keypoint_flip_errors
from raypose.models.routing import Routing
from raypose.models.vitpose import PoseEngine
from raypose.pipeline.arrow_views import fixed_lists, pairs
from raypose.pipeline.croppers import CropColumn, Pixels
from raypose.pipeline.faults import inject
from raypose.schema import POSE_OUTPUT_SCHEMA, fail_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoseSettings:
    """How each pose actor runs its models, every "auto" already resolved (`layout.resolve_layout`)."""

    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | float16
    batch_size: int = 8  # crops per forward
    threads: int | None = None  # torch threads on a CPU; None on a GPU
    flip_test: bool = False
    flip_uncertainty: bool = False  # pose.uncertainty: flip (resolved): the plain and mirrored predictions compared
    compile: bool = False


class PoseStage:
    """Ray actor for the pose stage: every checkpoint the routing uses, loaded once.

    The cropper (`croppers`) turns each batch into crop rows and their pixels: the batch's
    own crop column, or crops the actor makes on its CPU or its device; the forwards then run
    `settings.batch_size` crops at a time.
    """

    def __init__(self, routing: Routing, settings: PoseSettings = PoseSettings(), cropper=None):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.routing = routing
        self.settings = settings
        self.cropper = cropper or CropColumn()
        self.device = torch.device(settings.device)
        self.worker = f"{_node_id()}:{os.getpid()}"
        self._forwards = threading.Lock()
        self.engines: dict[tuple[str, str], PoseEngine] = {}
        for expert in routing.experts.values():
            key = (expert.model.model_id, expert.model.revision)
            if key not in self.engines:
                # resolve_routing lets a folded checkpoint serve one dataset_index only.
                self.engines[key] = PoseEngine(
                    expert.model, device=settings.device, dtype=settings.dtype,
                    fold_expert=expert.dataset_index if expert.folded else None, decode=routing.decode,
                    compile=settings.compile,
                )

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for part in self.cropper.parts(batch):  # a part's crops are cut, run and dropped before the next's
            rows, pixels = self.cropper(part, self.device)
            inject("pose")
            # With resources.pose_calls_per_actor > 1 calls run in threads: their crops overlap, their
            # forwards are submitted in turns (two at once would only fight over the cores or the GPU),
            # and on a GPU one call's next forward is queued while another's runs.
            out.append(estimate_rows(self.engines, self.routing, rows, pixels, flip_test=self.settings.flip_test,
                                     batch_size=self.settings.batch_size, worker=self.worker,
                                     device_lock=self._forwards, flip_uncertainty=self.settings.flip_uncertainty))
        return pa.concat_tables(out) if len(out) > 1 else out[0]


def estimate_rows(engines: dict, routing: Routing, batch: pa.Table, pixels: Pixels, flip_test: bool = False,
                  batch_size: int | None = None, worker: str | None = None,
                  device_lock: ContextManager = contextlib.nullcontext(), flip_uncertainty: bool = False) -> pa.Table:
    """Run each expert on its own rows (homogeneous forward batches of at most `batch_size`); failed rows pass through.

    `pixels(rows, input_size)` gives the crops of some rows; each forward is submitted holding
    `device_lock` (its crops cut, and on a CPU the forward run) and collected outside it.
    `flip_uncertainty` fills the flip columns (`imaging/uncertainty.py`) from the same forward
    as the flip test's, or from a mirrored forward of its own when the flip test is off.
    """
    n = batch.num_rows
    experts = batch.column("expert").to_pylist()
    stage = batch.column("error_stage").to_pylist()
    centers = pairs(batch.column("center"))
    scales = pairs(batch.column("scale"))
    forwards = []
    for name in sorted({e for e, s in zip(experts, stage) if s is None}):
        rows = [i for i in range(n) if experts[i] == name and stage[i] is None]
        step = batch_size or len(rows)
        forwards += [(name, rows[start : start + step]) for start in range(0, len(rows), step)]
    areas = _box_areas(batch.column("bbox")) if flip_uncertainty else None
    done = []  # (rows, keypoints, scores, keypoint schema, flip (errors, agreements) or None) of each forward that ran
    failed = np.zeros(n, bool)
    reasons = np.full(n, None, dtype=object)

    def fail(name: str, rows: list[int], exc: Exception) -> None:  # a failed batch becomes error rows, the job goes on
        log.error("pose batch of %d crops for expert %s failed", len(rows), name, exc_info=exc)
        failed[rows], reasons[rows] = True, f"{type(exc).__name__}: {exc}"

    def collect(name: str, rows: list[int], engine: PoseEngine, submitted, schema: str) -> None:
        try:
            keypoints, scores = engine.collect(submitted)
            views = engine.collect_views(submitted)
            flip = None
            if views is not None:
                flip = (keypoint_flip_errors(views[0], views[1], scales[rows], routing.experts[name].input_size),
                        flip_agreements(views[0], views[1], areas[rows], SCHEMAS[schema].sigmas))
            done.append((rows, keypoints, scores, schema, flip))
        except Exception as exc:
            fail(name, rows, exc)

    # One forward in flight: batch i+1's crops are cut and sent while batch i runs (on a GPU).
    in_flight = None
    for name, rows in forwards:
        expert = routing.experts[name]
        engine = engines[(expert.model.model_id, expert.model.revision)]
        try:
            with device_lock:
                inject("model")
                submitted = engine.submit(
                    pixels(rows, expert.input_size), centers[rows], scales[rows], dataset_index=expert.dataset_index,
                    flip_pairs=SCHEMAS[expert.keypoint_schema].flip_pairs if flip_test or flip_uncertainty else None,
                    average_flip=flip_test, flip_views=flip_uncertainty,
                )
        except Exception as exc:
            fail(name, rows, exc)
            continue
        if in_flight is not None:
            collect(*in_flight)
        in_flight = (name, rows, engine, submitted, expert.keypoint_schema)
    if in_flight is not None:
        collect(*in_flight)
    if failed.any():
        batch = fail_rows(batch, failed, "pose", reasons)
    box_scores = batch.column("box_score").to_numpy(zero_copy_only=False)
    pose_columns = _keypoint_columns(experts, done, box_scores)
    pose_columns["pose_worker"] = pa.array([worker] * n, pa.string())
    columns = {name: pose_columns[name] if name in pose_columns else batch.column(name)
               for name in POSE_OUTPUT_SCHEMA.names}
    return pa.table(columns, schema=POSE_OUTPUT_SCHEMA)


def _node_id() -> str:
    """The Ray node this actor runs on (the host's name outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()


def _keypoint_columns(experts: list, done: list, box_scores: np.ndarray) -> dict[str, pa.Array]:
    """The expert, keypoint, instance-score and flip columns from each forward's (rows, keypoints, scores,
    schema, flip), written forward by forward (no per-row Python); null where no forward (or no flip) ran."""
    n = len(experts)
    lengths = np.zeros(n, np.int32)
    schemas = np.full(n, None, dtype=object)
    flipped = np.zeros(n, bool)
    for rows, keypoints, _, schema, flip in done:
        lengths[rows], schemas[rows], flipped[rows] = keypoints.shape[1], schema, flip is not None
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    xs, ys, ss, errors = (np.empty(offsets[-1], np.float32) for _ in range(4))
    instance, oks, doubt = np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32)
    for rows, keypoints, scores, _, flip in done:
        at = offsets[rows][:, None] + np.arange(keypoints.shape[1])
        xs[at], ys[at], ss[at] = keypoints[..., 0], keypoints[..., 1], scores
        instance[rows] = instance_scores(scores, box_scores[rows])
        if flip is not None:
            errors[at], oks[rows] = flip[0], flip[1].mean(axis=1)
            doubt[rows] = instance_doubts(scores, flip[1], box_scores[rows])
    missing = lengths == 0
    lists = {name: pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=pa.array(missing))
             for name, values in (("keypoint_x", xs), ("keypoint_y", ys), ("keypoint_score", ss))}
    no_flip = pa.array(~flipped)
    return {
        "expert": pa.array(np.where(missing, None, np.array(experts, dtype=object)), pa.string()),
        "keypoint_schema": pa.array(schemas, pa.string()),
        **lists,
        "instance_score": pa.array(instance, pa.float32(), mask=missing),
        "keypoint_flip_error": pa.ListArray.from_arrays(pa.array(offsets), pa.array(errors), mask=no_flip),
        "flip_oks": pa.array(oks, pa.float32(), mask=~flipped),
        "instance_doubt": pa.array(doubt, pa.float32(), mask=~flipped),
    }


def _box_areas(bbox: pa.ChunkedArray) -> np.ndarray:
    """w x h of each row's COCO xywh box (a fixed_size_list<float32, 4> column); null rows read as NaN."""
    xywh = fixed_lists(bbox, 4).astype(np.float64)
    return np.where(np.asarray(bbox.is_valid()), xywh[:, 2] * xywh[:, 3], np.nan)
