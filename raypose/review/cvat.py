"""CVAT: the chosen images as a COCO Keypoints 1.0 file, and the skeleton labels CVAT must have before it imports it.

CVAT imports COCO keypoints only onto skeleton labels that already exist in the task, named as
the COCO category and with one point per keypoint name (the import fails otherwise: CVAT issues
5285, 7501, 9681). `raypose export cvat` writes into one folder:

- `cvat_labels.json`: one skeleton label per category, its points named and ordered as the
  keypoint schema and its edges the schema's skeleton, laid out where the output's instances
  hold them on average; paste it into the task's (or project's) label editor, Raw tab, first;
- `annotations/person_keypoints_default.json`: the chosen images' instances as `export coco`
  writes them (reviewers' corrections applied unless `corrections=False`), for *Upload
  annotations*, format *COCO Keypoints 1.0*;
- `images/`, with `copy_images`: the images themselves (tar members and Parquet rows too), to
  create the task from; `file_name` is then the copy's name, else the image key.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from raypose.review.copies import copy_images as copy_images_to
from raypose.review.drawing import instance_colours
from raypose.review.export import DEFAULT_MIN_SCORE, coco_from_output
from raypose.review.reading import JobOutput, write_bytes
from raypose.review.selection import Selection, choose_images, rows_of


def cvat_labels(categories: dict[str, dict[str, Any]], layouts: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """CVAT's raw label list: a skeleton per category ({category: schema}), points at `layouts` (K, 2) in 0-100."""
    labels = []
    for (name, schema), colour in zip(sorted(categories.items()), instance_colours(len(categories))):
        points = layouts[name]
        circles = "".join(
            f'<circle r="1.5" stroke="black" fill="#b3b3b3" cx="{x:.2f}" cy="{y:.2f}" stroke-width="0.1" '
            f'data-type="element node" data-element-id="{k + 1}" data-node-id="{k + 1}" '
            f'data-label-name="{keypoint}"></circle>'
            for k, (keypoint, (x, y)) in enumerate(zip(schema["keypoints"], points)))
        lines = "".join(
            f'<line x1="{points[a][0]:.2f}" y1="{points[a][1]:.2f}" x2="{points[b][0]:.2f}" y2="{points[b][1]:.2f}" '
            f'stroke="black" data-type="edge" data-node-from="{a + 1}" stroke-width="0.5" data-node-to="{b + 1}"></line>'
            for a, b in schema["skeleton"])
        labels.append({"name": name, "color": "#%02x%02x%02x" % colour, "type": "skeleton", "attributes": [],
                       "sublabels": [{"name": k, "type": "points", "attributes": []} for k in schema["keypoints"]],
                       "svg": lines + circles})
    return labels


def export_cvat(
    output: str,
    out: str,
    *,
    selection: Selection = Selection(),
    min_score: float = DEFAULT_MIN_SCORE,
    corrections: bool = True,
    copy_images: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write cvat_labels.json, annotations/person_keypoints_default.json (and images/) for the chosen images."""
    selection.check()
    job = JobOutput.open(output, storage_options)
    keys, matching = choose_images(job, selection)
    dataset, _ = coco_from_output(job, min_score=min_score, storage_options=storage_options, corrections=corrections,
                                  keys=keys)
    columns = ["image_key", "image_uri", "instance_index", "category", "keypoint_schema", "bbox", "keypoint_x",
               "keypoint_y"]
    rows = [r for rows in rows_of(job, keys, columns).values() for r in rows if r["keypoint_schema"]]
    categories = {r["category"]: job.schema(r["keypoint_schema"]) for r in rows}
    problems: list[str] = []
    if copy_images:
        copied, problems = copy_images_to(job, {r["image_key"]: r["image_uri"] for r in rows}, out, storage_options)
        for image in dataset["images"]:
            image["file_name"] = copied.get(image["file_name"], image["file_name"])
    root = out.rstrip("/")
    write_bytes(f"{root}/cvat_labels.json", json.dumps(cvat_labels(categories, _layouts(rows)), indent=1).encode(),
                storage_options, "--out")
    write_bytes(f"{root}/annotations/person_keypoints_default.json", json.dumps(dataset).encode(), storage_options,
                "--out")
    return {"images": len(dataset["images"]), "annotations": len(dataset["annotations"]), "matching": matching,
            "problems": problems, "out": out}


def _layouts(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per category, where its keypoints sit in their box on average, in a 10-90 frame (CVAT's skeleton editor)."""
    layouts: dict[str, list[np.ndarray]] = {}
    for r in rows:
        bx, by, bw, bh = (float(v) for v in r["bbox"])
        if bw > 0 and bh > 0:
            layouts.setdefault(r["category"], []).append(
                np.stack([(np.asarray(r["keypoint_x"], float) - bx) / bw, (np.asarray(r["keypoint_y"], float) - by) / bh], 1))
    return {name: 10 + 80 * np.clip(np.nan_to_num(np.nanmean(np.stack(found), axis=0), nan=0.5), 0, 1)
            for name, found in layouts.items()}
