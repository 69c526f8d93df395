"""Label Studio: the chosen images as tasks with raypose's predictions, the labeling config, and the reviewers' export back.

`raypose export label-studio` writes into one folder:

- `label_config.xml`: an Image, a RectangleLabels (`box`, one label per category), a
  KeyPointLabels (`keypoints`, one label per keypoint name of the schemas used, left side lighter,
  right side darker) and a Relations tag whose one label, `limb`, marks the skeleton's edges;
- `tasks.json`: one task per image: `data` (`image`: the URL, `image_key`, and the image's lowest
  `instance_score` and `flip_oks` and highest `instance_doubt`, columns to sort by in the Data
  Manager) and one prediction with every instance of the image: its box, its keypoints scored
  above `min_score` inside the image (as `export coco` labels them), a `limb` relation for each
  skeleton edge between two of them, and the prediction's `score` (lowest first = worst first);
- `images/`, with `--copy-images`: each image copied (read from its `image_uri`, a tar member or
  a Parquet row alike), the task's URL then `URL_PREFIX` + its file name.

Region ids carry the instance: `rp-<instance_index>-box` and `rp-<instance_index>-<keypoint>`.
`raypose import label-studio` reads a project's JSON export back: each annotation's regions
go back to their instance by those ids, or (a region the tool re-identified) by being exactly
where one instance's box or keypoint of that name was predicted; a keypoint the reviewer drew goes
to the one box that contains it, a box the reviewer drew stands for a new instance; anything it
cannot place is reported, never guessed. An instance whose regions the reviewer all deleted is
marked deleted.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from datetime import datetime, timezone
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from raypose.review.copies import copy_images as copy_images_to
from raypose.review.corrections import write_corrections
from raypose.review.drawing import instance_colours, keypoint_sides, side_colour
from raypose.review.export import labelled_keypoints
from raypose.review.reading import JobOutput, OutputError, read_json_file, write_bytes
from raypose.review.selection import Selection, choose_images, rows_of

TOOL = "label-studio"
IMAGE, BOX, KEYPOINTS, RELATIONS = "image", "box", "keypoints", "limb"
COLUMNS = [
    "image_key", "image_uri", "image_width", "image_height", "instance_index", "category", "bbox", "keypoint_schema",
    "keypoint_x", "keypoint_y", "keypoint_score", "instance_score", "flip_oks", "instance_doubt",
]  # fmt: skip
REGION_ID = re.compile(r"^rp-(\d+)-(box|\d+)$")
POINT_SIZE = 0.6  # a keypoint's drawn size, in percent of the image's width


def label_config(categories: dict[str, dict[str, Any]]) -> str:
    """The labeling config for instances of these categories ({category: keypoint schema description})."""
    names: list[str] = []
    for schema in categories.values():
        names += [n for n in schema["keypoints"] if n not in names]
    box_colours = instance_colours(len(categories))
    base = (255, 153, 0)
    sides = dict(zip(names, keypoint_sides(names)))
    boxes = "\n".join(f"    <Label value={quoteattr(c)} background={quoteattr(_hex(colour))}/>"
                      for c, colour in zip(sorted(categories), box_colours))
    points = "\n".join(f"    <Label value={quoteattr(n)} background={quoteattr(_hex(side_colour(base, sides[n])))}/>"
                       for n in names)
    skeletons = "; ".join(f"{c}: " + ", ".join(f"{s['keypoints'][a]}-{s['keypoints'][b]}" for a, b in s["skeleton"])
                          for c, s in sorted(categories.items()))
    return f"""<View>
  <!-- raypose: keypoints of {', '.join(sorted(categories))}; the skeleton is the {RELATIONS} relations between them
       ({skeletons.replace('--', '- -')}) -->
  <Header value="$image_key"/>
  <Image name="{IMAGE}" value="$image" zoom="true" zoomControl="true"/>
  <RectangleLabels name="{BOX}" toName="{IMAGE}" strokeWidth="2">
{boxes}
  </RectangleLabels>
  <KeyPointLabels name="{KEYPOINTS}" toName="{IMAGE}" strokeWidth="1">
{points}
  </KeyPointLabels>
  <Relations>
    <Relation value="{RELATIONS}"/>
  </Relations>
</View>
"""


def export_label_studio(
    output: str,
    out: str,
    *,
    selection: Selection = Selection(),
    min_score: float = 0.2,
    copy_images: bool = False,
    url_prefix: str = "/data/local-files/?d=images/",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write label_config.xml, tasks.json (and images/ with `copy_images`) for the chosen images into `out`."""
    selection.check()
    job = JobOutput.open(output, storage_options)
    keys, matching = choose_images(job, selection)
    rows_by_key = rows_of(job, keys, COLUMNS)
    categories = {row["category"]: job.schema(row["keypoint_schema"])
                  for rows in rows_by_key.values() for row in rows if row["keypoint_schema"]}
    first = {key: next(r for r in rows_by_key[key] if r["keypoint_schema"]) for key in keys}
    urls = {key: row["image_uri"] for key, row in first.items()}
    problems: list[str] = []
    if copy_images:
        copied, problems = copy_images_to(job, urls, out, storage_options)
        urls = {key: url_prefix + name for key, name in copied.items()}
    tasks = [task_for(key, urls[key], [r for r in rows_by_key[key] if r["keypoint_schema"]], job, min_score, selection.by)
             for key in keys if key in urls]
    write_bytes(posixpath.join(out.rstrip("/"), "tasks.json"), json.dumps(tasks, indent=1).encode(), storage_options,
                "--out")
    write_bytes(posixpath.join(out.rstrip("/"), "label_config.xml"), label_config(categories).encode(),
                storage_options, "--out")
    instances = sum(len(rows_by_key[t["data"]["image_key"]]) for t in tasks)
    return {"tasks": len(tasks), "matching": matching, "instances": instances, "problems": problems, "out": out}


def task_for(key: str, url: str, rows: list[dict], job: JobOutput, min_score: float, by: str) -> dict[str, Any]:
    """One image's task: its data and one prediction holding all its instances."""
    result: list[dict] = []
    for row in rows:
        result += _instance_regions(row, job.schema(row["keypoint_schema"]), min_score)
    worst = {"lowest_instance_score": _lowest(rows, "instance_score"), "lowest_flip_oks": _lowest(rows, "flip_oks"),
             "highest_instance_doubt": _highest(rows, "instance_doubt")}
    score = {"instance_score": worst["lowest_instance_score"], "flip_oks": worst["lowest_flip_oks"],
             "instance_doubt": None if worst["highest_instance_doubt"] is None else 1 - worst["highest_instance_doubt"]}[by]
    manifest = job.manifest or {}
    prediction = {"model_version": f"raypose {manifest.get('job_id', '')}".strip(), "result": result}
    if score is not None:
        prediction["score"] = round(min(1.0, max(0.0, score)), 6)
    return {"data": {"image": url, "image_key": key, **worst}, "predictions": [prediction]}


def _instance_regions(row: dict, schema: dict, min_score: float) -> list[dict]:
    width, height = row["image_width"], row["image_height"]
    index = row["instance_index"]
    common = {"to_name": IMAGE, "original_width": width, "original_height": height, "image_rotation": 0}
    bx, by, bw, bh = (float(v) for v in row["bbox"])
    regions = [{"id": f"rp-{index}-box", "from_name": BOX, "type": "rectanglelabels", **common,
                "value": {"x": 100 * bx / width, "y": 100 * by / height, "width": 100 * bw / width,
                          "height": 100 * bh / height, "rotation": 0, "rectanglelabels": [row["category"]]}}]
    if row["instance_score"] is not None:
        regions[0]["score"] = round(float(row["instance_score"]), 6)
    x, y, s = (np.asarray(row[c], np.float64) for c in ("keypoint_x", "keypoint_y", "keypoint_score"))
    shown = set(np.flatnonzero(labelled_keypoints(x, y, s, width, height, min_score)).tolist())
    for k in sorted(shown):
        regions.append({"id": f"rp-{index}-{k}", "from_name": KEYPOINTS, "type": "keypointlabels", **common,
                        "score": round(float(s[k]), 6),
                        "value": {"x": 100 * float(x[k]) / width, "y": 100 * float(y[k]) / height, "width": POINT_SIZE,
                                  "keypointlabels": [schema["keypoints"][k]]}})
    regions += [{"type": "relation", "from_id": f"rp-{index}-{a}", "to_id": f"rp-{index}-{b}", "direction": "bi",
                 "labels": [RELATIONS]} for a, b in schema["skeleton"] if a in shown and b in shown]
    return regions


# --- the reviewers' export back ---------------------------------------------------------------

def import_label_studio(output: str, export: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a Label Studio JSON export into the output's corrections table; return counts and what was not placed."""
    job = JobOutput.open(output, storage_options)
    tasks = read_json_file(export, storage_options, "EXPORT")
    if not isinstance(tasks, list) or any(not isinstance(t, dict) or "data" not in t for t in tasks):
        raise OutputError(f"EXPORT: {export} is not a Label Studio JSON export (a list of tasks with data and "
                          "annotations; export the project as JSON, not JSON-MIN)")
    keys = sorted({str(t["data"].get("image_key")) for t in tasks if t["data"].get("image_key") is not None})
    columns = ["image_key", "instance_index", "category", "keypoint_schema", "bbox", "keypoint_x", "keypoint_y",
               "image_width", "image_height", "job_id"]
    predicted = {key: [r for r in rows if r["keypoint_schema"]] for key, rows in rows_of(job, keys, columns).items()}
    category_schema = {r["category"]: r["keypoint_schema"] for rows in predicted.values() for r in rows
                       if r["keypoint_schema"]}
    rows, problems, annotations = [], [], 0
    for task in tasks:
        key = task["data"].get("image_key")
        if key is None or not predicted.get(str(key)):
            problems.append(f"task {task.get('id')}: image_key {key!r} names no labelled image of this output")
            continue
        for annotation in task.get("annotations") or []:
            if annotation.get("was_cancelled"):
                continue
            annotations += 1
            got, unplaced = corrections_of(annotation, predicted[str(key)], category_schema, job)
            problems += [f"task {task.get('id')} ({key}), annotation {annotation.get('id')}: {p}" for p in unplaced]
            meta = {"reviewer": _reviewer(annotation), "reviewed_at": _time(annotation), "tool": TOOL,
                    "task_id": _text(task.get("id")), "annotation_id": _text(annotation.get("id"))}
            rows += [{**r, **meta} for r in got]
    added = write_corrections(job, rows)
    return {"tasks": len(tasks), "annotations": annotations, "instances": len(rows), "added": added,
            "problems": problems}


def corrections_of(annotation: dict, predicted: list[dict], category_schema: dict[str, str],
                   job: JobOutput) -> tuple[list[dict], list[str]]:
    """An annotation's regions as one correction row per instance it covers; and what could not be placed."""
    by_index = {r["instance_index"]: r for r in predicted}
    width, height = predicted[0]["image_width"], predicted[0]["image_height"]
    instances: dict[str, dict] = {}  # "i<index>" or "new:<region id>" -> {"box": ..., "points": {name: (x, y)}}
    loose: list[dict] = []
    problems: list[str] = []
    for region in annotation.get("result") or []:
        if region.get("type") not in ("rectanglelabels", "keypointlabels"):
            continue
        match = REGION_ID.match(str(region.get("id", "")))
        index = int(match.group(1)) if match and int(match.group(1)) in by_index else _unmoved(region, predicted, job)
        if index is not None:
            slot = instances.setdefault(f"i{index}", {"box": None, "points": {}})
        elif region["type"] == "rectanglelabels":
            slot = instances.setdefault(f"new:{region.get('id')}", {"box": None, "points": {}})
        else:
            loose.append(region)
            continue
        _take(slot, region, width, height, problems)
    for region in loose:  # keypoints the reviewer added: to the one box holding them
        x, y = _point(region, width, height)
        holders = [name for name, slot in instances.items() if slot["box"] is not None and _inside(slot["box"], x, y)]
        label = (region["value"].get("keypointlabels") or ["?"])[0]
        if len(holders) != 1:
            problems.append(f"keypoint {label!r} at ({x:.1f}, {y:.1f}) lies in {len(holders)} boxes; "
                            "not placed (draw it from its instance's keypoints, or one box per person)")
            continue
        _take(instances[holders[0]], region, width, height, problems)
    rows = []
    for name, slot in sorted(instances.items()):
        if name.startswith("i"):
            row = by_index[int(name[1:])]
            category, schema_name = row["category"], row["keypoint_schema"]
            box = [float(v) for v in row["bbox"]]
            if slot["box"] is not None and not _same(slot["box"], box):
                box = slot["box"]
            new_instance, index = None, row["instance_index"]
        else:
            category = slot.get("category")
            schema_name = category_schema.get(category)
            if schema_name is None:
                problems.append(f"new box {name[4:]!r} of category {category!r}: no instance of it in this output "
                                "names its keypoint schema; not placed")
                continue
            box, new_instance, index = slot["box"], name[4:], None
        names = job.schema(schema_name)["keypoints"]
        xs, ys, vs = [math.nan] * len(names), [math.nan] * len(names), [0] * len(names)
        for label, (x, y) in slot["points"].items():
            if label not in names:
                problems.append(f"keypoint {label!r} is not in {schema_name}; not placed")
                continue
            k = names.index(label)
            if index is not None and _same((x, y), (row["keypoint_x"][k], row["keypoint_y"][k])):
                x, y = row["keypoint_x"][k], row["keypoint_y"][k]  # not moved: the prediction, not its % round trip
            xs[k], ys[k], vs[k] = x, y, 2
        rows.append({"image_key": predicted[0]["image_key"], "instance_index": index, "new_instance": new_instance,
                     "category": category, "keypoint_schema": schema_name, "bbox": box, "keypoint_x": xs,
                     "keypoint_y": ys, "keypoint_visibility": vs, "deleted": False,
                     "job_id": (row if index is not None else predicted[0])["job_id"]})
    # Every predicted instance the annotation no longer shows was removed by the reviewer.
    for index, row in sorted(by_index.items()):
        if f"i{index}" not in instances:
            rows.append({"image_key": row["image_key"], "instance_index": index, "new_instance": None,
                         "category": row["category"], "keypoint_schema": row["keypoint_schema"], "bbox": None,
                         "keypoint_x": None, "keypoint_y": None, "keypoint_visibility": None, "deleted": True,
                         "job_id": row["job_id"]})
    return rows, problems


def _unmoved(region: dict, predicted: list[dict], job: JobOutput) -> int | None:
    """The one instance whose predicted box, or keypoint of that name, is exactly where this region is (a region
    the tool gave an id of its own without moving it); else None."""
    width, height = predicted[0]["image_width"], predicted[0]["image_height"]
    value = region.get("value") or {}
    if region["type"] == "rectanglelabels":
        box = [value.get(k, math.nan) * size / 100 for k, size in (("x", width), ("y", height), ("width", width),
                                                                   ("height", height))]
        found = [r["instance_index"] for r in predicted if _same(box, r["bbox"])]
    else:
        point = _point(region, width, height)
        label = (value.get("keypointlabels") or [None])[0]
        found = []
        for r in predicted:
            names = job.schema(r["keypoint_schema"])["keypoints"]
            if label in names and _same(point, (r["keypoint_x"][names.index(label)], r["keypoint_y"][names.index(label)])):
                found.append(r["instance_index"])
    return found[0] if len(found) == 1 else None


def _take(slot: dict, region: dict, width: int, height: int, problems: list[str]) -> None:
    value = region.get("value") or {}
    if region["type"] == "rectanglelabels":
        slot["box"] = [value["x"] * width / 100, value["y"] * height / 100, value["width"] * width / 100,
                       value["height"] * height / 100]
        slot["category"] = (value.get("rectanglelabels") or [None])[0]
        return
    label = (value.get("keypointlabels") or [None])[0]
    if label in slot["points"]:
        problems.append(f"keypoint {label!r} given twice for one instance; the first kept")
        return
    slot["points"][label] = _point(region, width, height)


def _point(region: dict, width: int, height: int) -> tuple[float, float]:
    return region["value"]["x"] * width / 100, region["value"]["y"] * height / 100


def _same(a, b, tolerance: float = 1e-3) -> bool:
    """Equal to within the round trip through the tool's percentages (a thousandth of a pixel)."""
    return all(v is not None and w is not None and abs(float(v) - float(w)) < tolerance for v, w in zip(a, b))


def _inside(box: list[float], x: float, y: float) -> bool:
    bx, by, bw, bh = box
    return bx <= x <= bx + bw and by <= y <= by + bh


def _reviewer(annotation: dict) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("username") or who.get("id")
    return _text(who)


def _time(annotation: dict) -> datetime:
    stamp = annotation.get("updated_at") or annotation.get("created_at")
    try:
        moment = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:  # an annotation without a time sorts before every dated one
        return datetime(1970, 1, 1, tzinfo=timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _lowest(rows: list[dict], column: str) -> float | None:
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return round(min(values), 6) if values else None


def _highest(rows: list[dict], column: str) -> float | None:
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return round(max(values), 6) if values else None


def _hex(colour: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % colour
