"""The review loop on a real job's output: Label Studio tasks out, a reviewer's edits back, exports that use them.

The tasks are checked against Label Studio's own rules for predictions (label-studio-sdk's
`LabelInterface.validate_prediction`, transcribed below so the default test install needs no
SDK); with `RAYPOSE_LABEL_STUDIO_PYTHON` naming a Python that has label-studio-sdk, the SDK
itself validates them too.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pyarrow.parquet as pq
import pytest
from job_output import shared_job
from typer.testing import CliRunner

from raypose.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory, coco_folder, tiny_checkpoint):
    return shared_job(tmp_path_factory, coco_folder, tiny_checkpoint)


@pytest.fixture
def output(job, tmp_path):
    """A copy of the shared output: imports write into it."""
    return shutil.copytree(job.output, tmp_path / "out")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def label_studio_problems(config: str, prediction: dict) -> list[str]:
    """label-studio-sdk 2.1.2's checks of a prediction against a labeling config (`_validate_object_logic`,
    `_validate_region_logic`, `_validate_relation_logic`, the KeyPointLabels and RectangleLabels value models)."""
    root = ET.fromstring(config)
    controls = {el.get("name"): (el.tag.lower(), el.get("toName"), [lb.get("value") for lb in el.findall("Label")])
                for el in root.iter() if el.tag in ("RectangleLabels", "KeyPointLabels")}
    problems = []
    if not 0 <= prediction.get("score", 0) <= 1:
        problems.append(f"score {prediction['score']}")
    ids = set()
    for region in prediction["result"]:
        if region["type"] == "relation":
            continue
        missing = [f for f in ("from_name", "to_name", "type", "value") if f not in region]
        tag, to_name, labels = controls.get(region.get("from_name"), (None, None, []))
        value = region.get("value", {})
        geometry = ("x", "y") if tag == "keypointlabels" else ("x", "y", "width", "height")
        if missing or tag != region["type"] or to_name != region["to_name"]:
            problems.append(f"region {region.get('id')}: {missing or region['type']}")
        elif any(not isinstance(value.get(g), (int, float)) or not 0 <= value[g] <= 100 for g in geometry):
            problems.append(f"region {region.get('id')}: geometry {value}")
        elif len(value.get(tag, [])) != 1 or value[tag][0] not in labels:
            problems.append(f"region {region.get('id')}: label {value.get(tag)}")
        else:
            ids.add(region["id"])
    for relation in (r for r in prediction["result"] if r["type"] == "relation"):
        if relation.get("direction") not in ("left", "right", "bi") or relation.get("from_id") not in ids \
                or relation.get("to_id") not in ids:
            problems.append(f"relation {relation}")
    return problems


def reviewed(tasks: list[dict]) -> list[dict]:
    """A Label Studio JSON export of these tasks: each prediction accepted as its annotation, then edited."""
    exported = []
    for i, task in enumerate(tasks, start=1):
        result = copy.deepcopy(task["predictions"][0]["result"])
        exported.append({"id": 100 + i, "data": task["data"], "predictions": task["predictions"],
                         "annotations": [{"id": 500 + i, "completed_by": {"id": 7, "email": "ann@example.com"},
                                          "created_at": "2026-01-02T03:04:05.000000Z",
                                          "updated_at": "2026-01-02T03:05:00.000000Z", "was_cancelled": False,
                                          "result": result}]})
    return exported


def region(result: list[dict], region_id: str) -> dict:
    return next(r for r in result if r.get("id") == region_id)


def test_label_studio_round_trip_changes_exactly_the_edited_instances(output, tmp_path):
    # out: the worst images by flip OKS, as Label Studio tasks
    invoke("export", "label-studio", output, "--out", tmp_path / "ls", "--by", "flip_oks", "--sample", "10")
    config = (tmp_path / "ls" / "label_config.xml").read_text()
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    keypoints = pq.read_table(output / "keypoints").to_pylist()
    assert len(tasks) == len({r["image_key"] for r in keypoints}) == 4
    lowest_oks = [t["data"]["lowest_flip_oks"] for t in tasks]
    assert lowest_oks == sorted(lowest_oks) and all(t["predictions"][0]["score"] == t["data"]["lowest_flip_oks"]
                                                    for t in tasks)
    for task in tasks:
        assert label_studio_problems(config, task["predictions"][0]) == []
        assert task["data"]["image"].startswith("file://")  # the output's image_uri, as it is
    root = ET.fromstring(config)
    assert {lb.get("value") for lb in root.find("RectangleLabels")} == {"person", "dog"}
    assert root.find("Relations/Relation").get("value") == "limb"
    relations = [r for t in tasks for r in t["predictions"][0]["result"] if r["type"] == "relation"]
    assert relations  # the skeleton's edges between the keypoints shown

    before = tmp_path / "before.json"
    invoke("export", "coco", output, "--to", before)

    # back: one keypoint moved 12 px right, one instance deleted, one person drawn with two keypoints,
    # a keypoint dropped in no box, and a task whose image is not in the output
    export = reviewed(tasks)
    person_task = next(t for t in export if any(r.get("value", {}).get("rectanglelabels") == ["person"]
                                                and r["id"] == "rp-0-box" for r in t["annotations"][0]["result"]))
    result = person_task["annotations"][0]["result"]
    moved = next(r for r in result if r["type"] == "keypointlabels" and r["id"].startswith("rp-0-"))
    width = moved["original_width"]
    moved["value"]["x"] += 100 * 12 / width
    two = next(t for t in export if sum(r["id"].endswith("-box") for r in t["annotations"][0]["result"]
                                        if "id" in r) >= 2)
    two["annotations"][0]["result"] = [r for r in two["annotations"][0]["result"]
                                       if not (r.get("id", "").startswith("rp-1-") or r.get("from_id", "").startswith("rp-1-"))]
    common = {k: moved[k] for k in ("to_name", "original_width", "original_height", "image_rotation")}
    result += [
        {"id": "Xy12abCD", "from_name": "box", "type": "rectanglelabels", **common,
         "value": {"x": 80, "y": 80, "width": 15, "height": 15, "rotation": 0, "rectanglelabels": ["person"]}},
        {"id": "kp-new-1", "from_name": "keypoints", "type": "keypointlabels", **common,
         "value": {"x": 85, "y": 85, "width": 0.6, "keypointlabels": ["nose"]}},
        {"id": "kp-new-2", "from_name": "keypoints", "type": "keypointlabels", **common,
         "value": {"x": 90, "y": 92, "width": 0.6, "keypointlabels": ["left_ankle"]}},
        {"id": "kp-lost", "from_name": "keypoints", "type": "keypointlabels", **common,
         "value": {"x": 99.5, "y": 0.5, "width": 0.6, "keypointlabels": ["nose"]}},
    ]
    export.append({"id": 999, "data": {"image": "file:///elsewhere.jpg", "image_key": "elsewhere.jpg"},
                   "annotations": [{"id": 1, "result": [], "updated_at": "2026-01-02T03:05:00Z"}]})
    export_path = tmp_path / "project-export.json"
    export_path.write_text(json.dumps(export))

    first = runner.invoke(app, ["import", "label-studio", str(output), str(export_path)])
    assert first.exit_code == 0, first.output
    assert "kp-lost" not in first.stderr and "'nose' at" in first.stderr and "lies in 0 boxes" in first.stderr
    assert "'elsewhere.jpg' names no labelled image" in first.stderr
    corrections = pq.read_table(output / "corrections").to_pylist()
    covered = [r for r in keypoints if r["image_key"] in {t["data"]["image_key"] for t in export[:-1]}]
    assert len(corrections) == len(covered) + 1  # every instance of the reviewed images, and the drawn one
    assert {r["reviewer"] for r in corrections} == {"ann@example.com"} and {r["tool"] for r in corrections} == {"label-studio"}
    parts = sorted(p.name for p in (output / "corrections").iterdir())

    second = invoke("import", "label-studio", output, export_path)
    assert "0 new correction rows" in second.stdout
    assert sorted(p.name for p in (output / "corrections").iterdir()) == parts

    after = tmp_path / "after.json"
    done = invoke("export", "coco", output, "--to", after)
    assert "from reviewers' corrections" in done.stdout
    skipped = tmp_path / "skipped.json"
    invoke("export", "coco", output, "--to", skipped, "--corrections", "skip")
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    assert json.loads(skipped.read_text())["annotations"] == old["annotations"]
    old_by_id = {a["id"]: a for a in old["annotations"]}
    new_by_id = {a["id"]: a for a in new["annotations"]}
    moved_row = next(r for r in keypoints if r["image_key"] == person_task["data"]["image_key"] and r["instance_index"] == 0)
    deleted_row = next(r for r in keypoints if r["image_key"] == two["data"]["image_key"] and r["instance_index"] == 1)
    changed = {i for i in old_by_id if i in new_by_id and new_by_id[i] != old_by_id[i]}
    assert changed == {moved_row["annotation_id"]}
    assert set(old_by_id) - set(new_by_id) == {deleted_row["annotation_id"]}
    [drawn] = [new_by_id[i] for i in set(new_by_id) - set(old_by_id)]
    assert drawn["num_keypoints"] == 2 and drawn["bbox"][2] > 0
    k = int(moved["id"].rsplit("-", 1)[1])
    old_kp, new_kp = old_by_id[moved_row["annotation_id"]]["keypoints"], new_by_id[moved_row["annotation_id"]]["keypoints"]
    assert new_kp[3 * k] == pytest.approx(old_kp[3 * k] + 12, abs=0.02)
    assert [v for i, v in enumerate(new_kp) if i // 3 != k] == [v for i, v in enumerate(old_kp) if i // 3 != k]

    summary = json.loads(invoke("inspect", output, "--json").stdout)["review"]
    assert (summary["reviewed"], summary["deleted"], summary["added"]) == (len(covered) - 1, 1, 1)
    moved_name = moved["value"]["keypointlabels"][0]
    [entry] = [e for e in summary["by_schema"]["coco17"]["keypoints"] if e["name"] == moved_name]
    assert entry["mean_pixels"] == pytest.approx(12 / entry["labelled"], rel=1e-3)
    text = invoke("inspect", output).stdout
    assert f"review: {len(covered) - 1} instances reviewed, 1 deleted, 1 added" in text

    # a correction made on rows another run has rewritten since (append, a changed image) no longer applies
    from raypose.review.corrections import read_corrections, write_corrections
    from raypose.review.reading import JobOutput

    job = JobOutput.open(str(output))
    [moved_correction] = [r for r in read_corrections(job).to_pylist()
                          if (r["image_key"], r["instance_index"]) == (moved_row["image_key"], 0)]
    write_corrections(job, [{**moved_correction, "job_id": "an-older-run", "annotation_id": "9999",
                             "reviewed_at": moved_correction["reviewed_at"].replace(year=2027)}])
    later = runner.invoke(app, ["export", "coco", str(output), "--to", str(tmp_path / "later.json")])
    assert later.exit_code == 0 and "1 corrections left out: their images were relabelled" in later.stderr
    later_by_id = {a["id"]: a for a in json.loads((tmp_path / "later.json").read_text())["annotations"]}
    assert later_by_id[moved_row["annotation_id"]] == old_by_id[moved_row["annotation_id"]]


def test_copied_images_are_served_from_the_export_folder(output, tmp_path):
    invoke("export", "label-studio", output, "--out", tmp_path / "ls", "--copy-images", "--sample", "2")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert len(tasks) == 2
    for task in tasks:
        name = task["data"]["image"].removeprefix("/data/local-files/?d=images/")
        assert (tmp_path / "ls" / "images" / name).read_bytes()[:2] == b"\xff\xd8"  # the JPEG, copied


@pytest.mark.skipif(not os.environ.get("RAYPOSE_LABEL_STUDIO_PYTHON"),
                    reason="RAYPOSE_LABEL_STUDIO_PYTHON names no Python with label-studio-sdk (the transcribed rules run)")
def test_the_label_studio_sdk_accepts_the_tasks(output, tmp_path):
    invoke("export", "label-studio", output, "--out", tmp_path / "ls")
    python = os.environ["RAYPOSE_LABEL_STUDIO_PYTHON"]
    check = ("import json, sys\nfrom label_studio_sdk.label_interface import LabelInterface\n"
             "li = LabelInterface(open(sys.argv[1]).read())\n"
             "errors = [e for t in json.load(open(sys.argv[2])) for p in t['predictions']\n"
             "          for e in li.validate_prediction(p, return_errors=True)]\n"
             "print(json.dumps(errors)); sys.exit(1 if errors else 0)")
    done = subprocess.run([python, "-c", check, tmp_path / "ls" / "label_config.xml", tmp_path / "ls" / "tasks.json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cvat_gets_coco_keypoints_and_the_skeleton_labels_to_import_them_onto(output, tmp_path):
    from pycocotools.coco import COCO

    invoke("export", "cvat", output, "--out", tmp_path / "cvat", "--by", "instance_doubt", "--copy-images")
    labels = json.loads((tmp_path / "cvat" / "cvat_labels.json").read_text())
    annotations = tmp_path / "cvat" / "annotations" / "person_keypoints_default.json"
    dataset = json.loads(annotations.read_text())
    COCO(str(annotations))  # pycocotools loads it, as CVAT's COCO importer (datumaro) does
    categories = {c["name"]: c for c in dataset["categories"]}
    assert {label["name"] for label in labels} == set(categories) == {"person", "dog"}
    for label in labels:
        # as CVAT's dataset manager reads a skeleton (cvat/apps/dataset_manager/bindings.py): circles are the
        # points in order, lines the joints between 1-based node ids
        svg = ET.fromstring("<root>" + label["svg"] + "</root>")
        points = [el.attrib["data-label-name"] for el in svg if el.tag == "circle"]
        joints = [[int(el.attrib["data-node-from"]), int(el.attrib["data-node-to"])] for el in svg if el.tag == "line"]
        assert label["type"] == "skeleton" and [s["name"] for s in label["sublabels"]] == points
        assert points == categories[label["name"]]["keypoints"] and joints == categories[label["name"]]["skeleton"]
    for image in dataset["images"]:
        assert (tmp_path / "cvat" / "images" / image["file_name"]).exists()
    assert len(dataset["annotations"]) == pq.read_table(output / "keypoints").num_rows


def test_render_chooses_by_flip_oks_and_refuses_a_column_the_output_lacks(output, tmp_path):
    rows = pq.read_table(output / "keypoints").to_pylist()
    worst = min(rows, key=lambda r: r["flip_oks"])["image_key"]
    invoke("render", output, "--out", tmp_path / "qa", "--by", "flip_oks", "--sample", "1")
    page = (tmp_path / "qa" / "index.html").read_text()
    assert "worst first by flip_oks" in page and worst in page
    bad = runner.invoke(app, ["render", str(output), "--out", str(tmp_path / "qa2"), "--by", "flip"])
    assert bad.exit_code == 2 and "--by: expected one of instance_score, flip_oks, instance_doubt" in bad.stderr
