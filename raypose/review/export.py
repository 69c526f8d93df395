"""`raypose export coco`: a job's keypoint table as a COCO keypoints dataset and COCO results.

Two files, both plain JSON that pycocotools, CVAT, Label Studio, FiftyOne and mmpose read:

- the *dataset* (`--to`): `images` (id, file_name = image_key, width, height), `annotations`
  (id, image_id, category_id, bbox, area, iscrowd, keypoints as flat [x, y, v, ...],
  num_keypoints, score) and `categories` (name, keypoint names, 1-based skeleton);
- the *results* (`--results`): one entry per instance, `image_id`, `category_id`,
  `keypoints` as flat [x, y, score, ...] and `score`, as COCOeval's `loadRes` wants.

Visibility in the dataset: a keypoint whose score is above `min_score` and which lies inside
the image is written `[x, y, 2]` (labeled); any other keypoint is written `[0, 0, 0]`
(COCO's "not labeled"). The model never says "occluded", so `v = 1` is not used: a
low-confidence point is an unknown, and COCO GT and labeling tools treat `v = 0` that way
(COCOeval ignores it; an annotator sees an unplaced point). `num_keypoints` counts `v = 2`.
The results file keeps every keypoint and every instance with its raw score: ranking and
thresholds are the evaluator's business.

Ids: annotation ids are the table's `annotation_id` (the boxes file's ids), so results and
annotations line up with the GT the boxes came from; rows without one get fresh ids above the
largest. Image ids come from a GT COCO file when one is given (`file_name` -> `id`, the same
key raypose uses), else they are 1..N in image-key order. Category ids come from the GT
file's categories by name when given, else 1..N in name order.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow.dataset as ds

from raypose.review.corrections import current_corrections, latest_corrections
from raypose.review.reading import JobOutput, OutputError, read_json_file, write_bytes

COLUMNS = [
    "image_key", "image_width", "image_height", "instance_index", "annotation_id", "category", "bbox",
    "box_score", "keypoint_schema", "keypoint_x", "keypoint_y", "keypoint_score", "instance_score", "job_id",
]  # fmt: skip

DEFAULT_MIN_SCORE = 0.2  # the same floor as the instance score's (mmpose's rescoring)


def export_coco(
    output: str,
    to: str | None,
    results: str | None = None,
    *,
    gt: str | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    storage_options: dict[str, Any] | None = None,
    corrections: bool = True,
) -> dict[str, Any]:
    """Write the COCO dataset to `to` and/or the COCO results to `results`; return counts."""
    if not to and not results:
        raise OutputError("export coco: give --to (the dataset) and/or --results (the results file)")
    if not math.isfinite(min_score):
        raise OutputError(f"--min-score: expected a number, got {min_score}")
    job = JobOutput.open(output, storage_options)
    dataset, result_list = coco_from_output(job, gt=gt, min_score=min_score, storage_options=storage_options,
                                            corrections=corrections)
    if to:
        write_bytes(to, _dumps(dataset), storage_options, "--to")
    if results:
        write_bytes(results, _dumps(result_list), storage_options, "--results")
    return {
        "images": len(dataset["images"]),
        "annotations": len(dataset["annotations"]),
        "results": len(result_list),
        "categories": len(dataset["categories"]),
        "corrected": dataset["info"]["corrections"],
        "stale": dataset["info"]["corrections_stale"],
        "to": to,
        "results_path": results,
    }


def coco_from_output(
    job: JobOutput,
    *,
    gt: str | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    storage_options: dict[str, Any] | None = None,
    corrections: bool = True,
    keys: list[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(COCO keypoints dataset, COCO results list) for a job's output (or only the images `keys` names).

    With `corrections`, the dataset takes each reviewed instance from the corrections table
    (`raypose import`) in place of its prediction, leaves out the instances reviewers deleted and
    adds those they drew; the results file stays the model's predictions (to score them against
    the corrected dataset).
    """
    table = job.read(COLUMNS, filter=ds.field("image_key").isin(keys) if keys is not None else None)
    rows = table.to_pylist() if table is not None else []
    rows.sort(key=lambda r: (r["image_key"], r["instance_index"] if r["instance_index"] is not None else -1))
    gt_data = _load_gt(gt, storage_options) if gt else None
    reviewed, stale = current_corrections(latest_corrections(job) if corrections else [], rows)
    by_instance = {(c["image_key"], c["instance_index"]): c for c in reviewed if c["instance_index"] is not None}
    added = [c for c in reviewed if c["instance_index"] is None and not c["deleted"]]

    image_ids = _image_ids(rows, gt_data, gt)
    categories, category_ids = _categories(rows, job, gt_data)
    images: dict[str, dict[str, Any]] = {}
    annotations, results = [], []
    ids = _annotation_ids(rows)
    for row, ann_id in zip(rows, ids):
        key = row["image_key"]
        images.setdefault(key, {"id": image_ids[key], "file_name": key, "width": row["image_width"],
                                "height": row["image_height"]})
        annotation, result = _coco_instance(row, ann_id, image_ids[key], category_ids[row["category"]], min_score)
        results.append(result)
        correction = by_instance.get((key, row["instance_index"]))
        if correction is not None and correction["deleted"]:
            continue
        if correction is not None:
            annotation = _corrected(annotation, correction)
        annotations.append(annotation)
    next_id = max(ids, default=0) + 1  # drawn instances after every predicted one: no predicted id moves
    for correction in added:
        if correction["category"] not in category_ids:
            continue  # a category no prediction has (labelstudio refuses these at import)
        annotation = {"id": next_id, "image_id": image_ids[correction["image_key"]],
                      "category_id": category_ids[correction["category"]], "iscrowd": 0, "score": 1.0}
        annotations.append(_corrected(annotation, correction))
        next_id += 1

    manifest = job.manifest or {}
    dataset = {
        "info": {
            "description": f"raypose keypoints from job {manifest.get('job_id', '?')}",
            "raypose_job_id": manifest.get("job_id"),
            "models": {name: {"model": e.get("model"), "revision": e.get("revision")}
                       for name, e in job.experts.items()},
            "keypoint_min_score": min_score,
            "corrections": len(by_instance) + len(added),
            "corrections_stale": stale,
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "licenses": [],
        "images": sorted(images.values(), key=lambda im: im["id"]),
        "annotations": annotations,
        "categories": categories,
    }
    return dataset, results


def _coco_instance(row: dict, ann_id: int, image_id: int, category_id: int,
                   min_score: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """One row as a COCO annotation (keypoints scored above `min_score` labeled, v=2) and a COCO result."""
    width, height = row["image_width"], row["image_height"]
    x = np.asarray(row["keypoint_x"], np.float64)
    y = np.asarray(row["keypoint_y"], np.float64)
    s = np.asarray(row["keypoint_score"], np.float64)
    labeled = labelled_keypoints(x, y, s, width, height, min_score)
    xr, yr = _round(x, 2), _round(y, 2)
    flat_gt: list[float] = []
    flat_res: list[float] = []
    for i in range(len(s)):
        flat_gt += [xr[i], yr[i], 2] if labeled[i] else [0, 0, 0]
        flat_res += [xr[i], yr[i], _round1(s[i], 4)]
    bx, by, bw, bh = (float(v) for v in row["bbox"])
    bbox = [round(bx, 2), round(by, 2), round(bw, 2), round(bh, 2)]
    score = row["instance_score"]
    score = _round1(score, 6) if score is not None and math.isfinite(score) else 0.0
    annotation = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
                  "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0, "keypoints": flat_gt,
                  "num_keypoints": int(labeled.sum()), "score": score}
    return annotation, {"image_id": image_id, "category_id": category_id, "keypoints": flat_res, "score": score}


def labelled_keypoints(x: np.ndarray, y: np.ndarray, scores: np.ndarray, width: int, height: int,
                       min_score: float) -> np.ndarray:
    """Which keypoints an export labels (v=2): scored above `min_score`, finite, inside the image."""
    labelled = (scores > min_score) & np.isfinite(x) & np.isfinite(y) & np.isfinite(scores)
    return labelled & (x >= 0) & (y >= 0) & (x <= width) & (y <= height)


def _corrected(annotation: dict[str, Any], correction: dict[str, Any]) -> dict[str, Any]:
    """A COCO annotation with the reviewer's box and keypoints (labelled ones v=2, others [0, 0, 0])."""
    bbox = [round(float(v), 2) for v in correction["bbox"]] if correction["bbox"] is not None else annotation["bbox"]
    flat: list[float] = []
    for x, y, v in zip(correction["keypoint_x"], correction["keypoint_y"], correction["keypoint_visibility"]):
        flat += [round(float(x), 2), round(float(y), 2), int(v)] if v > 0 else [0, 0, 0]
    return {**annotation, "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "keypoints": flat,
            "num_keypoints": sum(1 for v in correction["keypoint_visibility"] if v > 0)}


def _load_gt(gt: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    data = read_json_file(gt, storage_options, "--gt")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise OutputError(f"--gt: {gt} is not a COCO annotations file (no 'images' list)")
    return data


def _image_ids(rows: list[dict], gt_data: dict | None, gt: str | None) -> dict[str, int]:
    keys = sorted({r["image_key"] for r in rows})
    if gt_data is None:
        return {key: i for i, key in enumerate(keys, start=1)}
    by_name = {im["file_name"]: im["id"] for im in gt_data["images"] if "file_name" in im and "id" in im}
    missing = [k for k in keys if k not in by_name]
    if missing:
        raise OutputError(
            f"--gt: {len(missing)} of {len(keys)} images are not in {gt} (by file_name), e.g. {missing[0]!r}; "
            "give the COCO file the job's boxes came from"
        )
    return {key: by_name[key] for key in keys}


def _categories(rows: list[dict], job: JobOutput, gt_data: dict | None) -> tuple[list[dict], dict[str, int]]:
    schema_of: dict[str, str] = {}
    for r in rows:
        known = schema_of.setdefault(r["category"], r["keypoint_schema"])
        if known != r["keypoint_schema"]:
            raise OutputError(
                f"category {r['category']!r} has instances in two keypoint schemas ({known}, {r['keypoint_schema']}); "
                "a COCO category has one keypoint list"
            )
    gt_ids = {}
    if gt_data is not None:
        gt_ids = {c["name"]: c["id"] for c in gt_data.get("categories", []) if "name" in c and "id" in c}
    next_id = max(gt_ids.values(), default=0) + 1
    categories, ids = [], {}
    for name in sorted(schema_of):
        if name in gt_ids:
            ids[name] = gt_ids[name]
        else:
            ids[name], next_id = next_id, next_id + 1
        schema = job.schema(schema_of[name])
        categories.append(
            {
                "id": ids[name],
                "name": name,
                "supercategory": name,
                "keypoints": list(schema["keypoints"]),
                "skeleton": [[a + 1, b + 1] for a, b in schema["skeleton"]],  # COCO's skeleton is 1-based
            }
        )
    return sorted(categories, key=lambda c: c["id"]), ids


def _annotation_ids(rows: list[dict]) -> list[int]:
    given = [r["annotation_id"] for r in rows if r["annotation_id"] is not None]
    if len(given) != len(set(given)):
        seen, dupes = set(), set()
        for a in given:
            (dupes if a in seen else seen).add(a)
        raise OutputError(
            f"annotation_id is not unique in the table ({len(dupes)} repeated, e.g. {min(dupes)}); "
            "COCO annotation ids must be"
        )
    next_id = max(given, default=0) + 1
    ids = []
    for r in rows:
        if r["annotation_id"] is not None:
            ids.append(int(r["annotation_id"]))
        else:
            ids.append(next_id)
            next_id += 1
    return ids


def _round(values: np.ndarray, digits: int) -> list[float]:
    return [round(float(v), digits) if math.isfinite(v) else 0.0 for v in values]


def _round1(value: float, digits: int) -> float:
    value = float(value)
    return round(value, digits) if math.isfinite(value) else 0.0


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
