"""`raypose.annotate`: a job's stages applied to a user's own Ray Dataset, returning a Dataset of keypoint rows.

    labelled = raypose.annotate(ray.data.read_images("photos/", include_paths=True),
                                "usyd-community/vitpose-base-simple", boxes={"bbox_column": "boxes"})

The rows become image tasks (`inputs/rows.py`), then go through the very stages a job builds
(`stages.labelling_stages`: detector, crops, pose actors), laid out by the same layout (`layout.py`: device,
dtype, actor pools and their autoscaling, batch sizes). What comes out has the keypoints table's columns
(less `job_id`) and a failure's stage and reason (`schema.ANNOTATED_SCHEMA`). Nothing runs until the
Dataset is consumed (`write_parquet`, `iter_batches`, `to_pandas`, ...).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from raypose.config.paths import resolve_paths
from raypose.config.spec import BoxesSpec, ImagesSpec, JobSpec, LimitsSpec, PoseSpec, ResourcesSpec, parse_job_spec
from raypose.errors import SpecError
from raypose.inputs.rows import image_tasks_of_rows
from raypose.pipeline.stages import Stage, labelling_stages
from raypose.schema import ANNOTATED_SCHEMA

if TYPE_CHECKING:
    from ray.data import Dataset

# What `images.path` is when the rows' keys are not made relative to a folder: no path starts with it.
NO_ROOT = "(dataset)"
# The sections `annotate` takes, and the keys of a job's that have no meaning for a Dataset's rows.
NOT_FOR_A_DATASET = {
    "images": ("format", "storage_options", "extensions"),
    "boxes": ("path", "storage_options", "image_key_column", "include_crowd"),
}


def annotate(
    ds: Dataset,
    pose: str | PoseSpec | Mapping[str, Any],
    *,
    boxes: BoxesSpec | Mapping[str, Any] | None = None,
    images: ImagesSpec | Mapping[str, Any] | None = None,
    resources: ResourcesSpec | Mapping[str, Any] | None = None,
    limits: LimitsSpec | Mapping[str, Any] | None = None,
) -> Dataset:
    """Label the people (or animals) in a Dataset's images: a lazy Dataset of keypoint rows, one per instance.

    `pose` is a checkpoint (hub id or local directory) or the job spec's `pose` section; `boxes`, `images`,
    `resources` and `limits` are the job spec's sections (docs/job-spec.md), as mappings or spec objects.
    The rows' boxes are read from `boxes.bbox_column` (default `bbox`: a list of COCO `[x, y, w, h]`), with
    `category_column` and `score_column` when present; `boxes={"source": "detector"}` finds them instead.
    The image is `images.image_column` (default `image`): encoded bytes, a `{bytes, path}` struct, or a
    `read_images` array. Failures are rows with `error_stage` and `error_reason`, never an exception.
    """
    spec = annotation_spec(pose, boxes=boxes, images=images, resources=resources, limits=limits)
    stages = annotation_stages(spec)
    dataset = ds.map_batches(image_tasks_of_rows, batch_format="pyarrow", batch_size=spec.resources.images_per_crop_task,
                             fn_kwargs={"images": spec.images, "boxes": spec.boxes, "working_dir": os.getcwd()})
    for stage in stages:
        dataset = stage.apply(dataset)
    return dataset


def annotation_spec(pose: str | PoseSpec | Mapping[str, Any], *, boxes: Any = None, images: Any = None,
                    resources: Any = None, limits: Any = None) -> JobSpec:
    """The job spec `annotate` runs: the given sections, boxes from the rows unless a detector is asked for.

    Validated as a job's is (errors name the field); keys that only a job's files have are refused.
    """
    sections = {"pose": {"model": pose} if isinstance(pose, str) else pose, "boxes": boxes, "images": images,
                "resources": resources, "limits": limits}
    raw: dict[str, Any] = {name: _plain(value) for name, value in sections.items() if value is not None}
    for section, keys in NOT_FOR_A_DATASET.items():
        given = sorted(set(raw.get(section, {})) & set(keys))
        if given:
            raise SpecError(f"{section}.{given[0]}: not for a Dataset's rows (annotate reads the images and boxes "
                            "the rows hold); see docs/python.md")
    raw.setdefault("boxes", {}).setdefault("source", "inline")
    if raw["boxes"]["source"] not in ("inline", "detector"):
        raise SpecError(f"boxes.source: {raw['boxes']['source']!r}: annotate takes the boxes the rows hold "
                        "(inline) or a detector's (detector)")
    resolve_paths(raw, Path.cwd())  # a local model folder or images.path, relative to the working directory
    raw.setdefault("images", {}).setdefault("path", NO_ROOT)
    raw["images"]["format"] = "parquet"  # rows that hold their images, as a job's Parquet images do
    raw["output"] = {"path": NO_ROOT}
    return parse_job_spec({"name": "annotate", **raw})


def annotation_stages(spec: JobSpec) -> list[Stage]:
    """The stages `annotate` applies after the rows become image tasks: checked models, the layout for the
    connected Ray cluster (an embedded one if none), then the labelling stages and the rows' last form."""
    from raypose.pipeline.layout import resolve_layout
    from raypose.pipeline.plan import check_models
    from raypose.pipeline.runtime import start_ray

    detecting = spec.boxes.detects
    routing, _ = check_models(spec, detecting)  # the detector too, before any row is read, as a job's plan does
    cluster = start_ray(spec.resources)
    # How many images a lazy Dataset holds is not known: laid out as for a large job.
    layout = resolve_layout(spec, routing, cluster, sys.maxsize, detecting=detecting, source_tasks=True)
    per_call = spec.resources.images_per_crop_task
    stages = [_bounded(stage, per_call) for stage in labelling_stages(spec, routing, detecting, layout)]
    models = {name: (e.model.model_id, e.model.revision) for name, e in routing.experts.items()}
    stages.append(Stage("rows", annotated_rows, {"models": models}, {"batch_size": None, "num_cpus": 0}))
    return stages


def _bounded(stage: Stage, images: int) -> Stage:
    """A stage that would take whole blocks of image rows takes `images` at a time: a user's Dataset's blocks
    may be of any size, a job's are `resources.images_per_crop_task` images."""
    if stage.map_args.get("batch_size") is not None:
        return stage
    return replace(stage, map_args={**stage.map_args, "batch_size": images})


def annotated_rows(batch: pa.Table, *, models: dict[str, tuple[str, str | None]]) -> pa.Table:
    """Pose rows -> `schema.ANNOTATED_SCHEMA`: labelled instances and failures, each instance with its model
    and revision; an image's placeholder row (nothing to label) is dropped."""
    rows = batch.filter(pc.or_(batch.column("keypoint_x").is_valid(), batch.column("error_stage").is_valid()))
    labelled = rows.column("keypoint_x").is_valid().to_pylist()
    made_by = [models[expert] if ok else (None, None) for expert, ok in zip(rows.column("expert").to_pylist(), labelled)]
    run = {"model_id": pa.array([m[0] for m in made_by], pa.string()),
           "model_revision": pa.array([m[1] for m in made_by], pa.string())}
    return pa.table({name: run[name] if name in run else rows.column(name) for name in ANNOTATED_SCHEMA.names},
                    schema=ANNOTATED_SCHEMA)


def _plain(section: Any) -> dict[str, Any]:
    """A section given as a spec object or a mapping, as plain data (only the keys that were set)."""
    if isinstance(section, BaseModel):
        return section.model_dump(mode="json", exclude_unset=True)
    if isinstance(section, Mapping):
        return {key: _plain(value) if isinstance(value, BaseModel) else value for key, value in section.items()}
    raise SpecError(f"expected a mapping or a spec section, got {type(section).__name__}")
