"""`raypose export coco`: a COCO keypoints dataset and COCO results that pycocotools loads and evaluates."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_output import DOG_SCHEMA, shared_job
from pycocotools.coco import (
    COCO,  # the test extra's reference evaluator; export itself does not need it
)
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from raypose.cli import app
from raypose.imaging.keypoint_schemas import COCO17, SCHEMAS

runner = CliRunner()


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory, coco_folder, tiny_checkpoint):
    return shared_job(tmp_path_factory, coco_folder, tiny_checkpoint)


def export(*args: str):
    result = runner.invoke(app, ["export", "coco", *map(str, args)])
    return result


def evaluate(gt_path, results_path) -> np.ndarray:
    """COCOeval keypoints stats (10 numbers), pycocotools' chatter swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(str(results_path))
        evaluator = COCOeval(gt, dt, iouType="keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def test_export_against_the_gt_the_boxes_came_from(job, tmp_path):
    result = export(job.output, "--to", tmp_path / "dataset.json", "--results", tmp_path / "results.json",
                    "--gt", job.gt)
    assert result.exit_code == 0, result.output
    assert "7 annotations" in result.stdout

    rows = pq.read_table(job.output / "keypoints").to_pylist()
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    results = json.loads((tmp_path / "results.json").read_text())

    # ids are the GT's: images by file_name, annotations by annotation_id, categories by name
    gt_image_ids = {im["file_name"]: im["id"] for im in job.coco["images"]}
    assert {im["file_name"]: im["id"] for im in dataset["images"]} == {
        k: gt_image_ids[k] for k in {r["image_key"] for r in rows}}
    assert sorted(a["id"] for a in dataset["annotations"]) == sorted(r["annotation_id"] for r in rows)
    gt_anns = {a["id"]: a for a in job.coco["annotations"]}
    for ann in dataset["annotations"]:
        assert ann["image_id"] == gt_anns[ann["id"]]["image_id"]
        assert ann["category_id"] == gt_anns[ann["id"]]["category_id"]
    assert [(c["id"], c["name"]) for c in dataset["categories"]] == [(1, "person"), (2, "dog")]

    # categories carry each schema's names and its 1-based skeleton, from the sidecar
    sidecar = json.loads((job.output / "keypoint_schemas.json").read_text())
    person, dog = dataset["categories"]
    assert person["keypoints"] == list(COCO17.keypoints) == sidecar["coco17"]["keypoints"]
    assert person["skeleton"] == [[a + 1, b + 1] for a, b in sidecar["coco17"]["skeleton"]]
    assert dog["keypoints"] == list(SCHEMAS[DOG_SCHEMA].keypoints)
    assert dog["skeleton"] == [[a + 1, b + 1] for a, b in SCHEMAS[DOG_SCHEMA].skeleton]

    # width/height from the table; keypoints: [x, y, 2] above the threshold and inside the image, else [0, 0, 0]
    by_id = {r["annotation_id"]: r for r in rows}
    for ann in dataset["annotations"]:
        row = by_id[ann["id"]]
        image = next(im for im in dataset["images"] if im["id"] == ann["image_id"])
        assert (image["width"], image["height"]) == (row["image_width"], row["image_height"])
        triples = np.array(ann["keypoints"]).reshape(-1, 3)
        for (x, y, v), rx, ry, s in zip(triples, row["keypoint_x"], row["keypoint_y"], row["keypoint_score"]):
            inside = 0 <= rx <= row["image_width"] and 0 <= ry <= row["image_height"]
            if s > 0.2 and inside:
                assert v == 2 and abs(x - rx) < 0.006 and abs(y - ry) < 0.006
            else:
                assert (x, y, v) == (0, 0, 0)
        assert ann["num_keypoints"] == int((triples[:, 2] > 0).sum())
        assert ann["bbox"] == pytest.approx(row["bbox"], abs=0.006)
        assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3], abs=0.01)
        assert ann["score"] == pytest.approx(row["instance_score"], abs=1e-6)

    # results: every instance, [x, y, score] triples, the instance score
    assert len(results) == len(rows)
    assert all(len(r["keypoints"]) == 3 * 17 and set(r) == {"image_id", "category_id", "keypoints", "score"}
               for r in results)

    # pycocotools loads both and COCOeval runs against the GT the boxes came from (random weights: AP is low)
    stats = evaluate(job.gt, tmp_path / "results.json")
    assert stats.shape == (10,)
    assert stats[0] < 0.5
    with contextlib.redirect_stdout(io.StringIO()):
        assert len(COCO(str(tmp_path / "dataset.json")).getAnnIds()) == len(rows)


def test_an_export_evaluated_against_itself_scores_ap_1(job, tmp_path):
    """The dataset file as GT, the results from the same rows: every prediction is exact, so AP = 1.0."""
    for min_score in ("0.2", "0"):
        out = tmp_path / min_score
        result = export(job.output, "--to", out / "dataset.json", "--results", out / "results.json",
                        "--min-score", min_score)
        assert result.exit_code == 0, result.output
        dataset = json.loads((out / "dataset.json").read_text())
        # without --gt: images 1..N in image-key order, categories 1..N in name order
        keys = [im["file_name"] for im in sorted(dataset["images"], key=lambda im: im["id"])]
        assert keys == sorted(keys) and [im["id"] for im in dataset["images"]] == list(range(1, len(keys) + 1))
        assert [c["name"] for c in dataset["categories"]] == ["dog", "person"]
        assert all(a["num_keypoints"] > 0 for a in dataset["annotations"])
        stats = evaluate(out / "dataset.json", out / "results.json")
        assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0) and stats[2] == pytest.approx(1.0)
        assert stats[5] == pytest.approx(1.0)  # AR


def test_export_checks_its_inputs(job, tmp_path):
    nothing = export(job.output)
    assert nothing.exit_code == 2 and "--to" in nothing.stderr

    other_gt = {"images": [{"id": 1, "file_name": "img_0000.jpg"}], "annotations": [], "categories": []}
    (tmp_path / "other.json").write_text(json.dumps(other_gt))
    wrong_gt = export(job.output, "--to", tmp_path / "d.json", "--gt", tmp_path / "other.json")
    assert wrong_gt.exit_code == 2
    assert "are not in" in wrong_gt.stderr and not (tmp_path / "d.json").exists()

    not_output = export(tmp_path, "--to", tmp_path / "d.json")
    assert not_output.exit_code == 2 and "not a raypose output" in not_output.stderr
    missing_gt = export(job.output, "--to", tmp_path / "d.json", "--gt", tmp_path / "nope.json")
    assert missing_gt.exit_code == 2 and "does not exist" in missing_gt.stderr


def test_export_reads_and_writes_fsspec_urls(job):
    """memory:// stands for any fsspec URL (s3://, gs://): the output is read and the files written through it."""
    fs = fsspec.filesystem("memory")
    fs.put(str(job.output), "/export-test/out", recursive=True)
    try:
        result = export("memory://export-test/out", "--to", "memory://export-test/coco/dataset.json",
                        "--results", "memory://export-test/coco/results.json")
        assert result.exit_code == 0, result.output
        dataset = json.loads(fs.cat_file("/export-test/coco/dataset.json"))
        assert len(dataset["annotations"]) == pq.read_table(job.output / "keypoints").num_rows
        assert fs.exists("/export-test/coco/results.json")
    finally:
        fs.rm("/export-test", recursive=True)


def test_rows_without_annotation_ids_get_fresh_ones(job, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(job.output, out)
    path = sorted((out / "keypoints").glob("*.parquet"))[0]
    table = pq.read_table(path)
    ids = table.column("annotation_id").to_pylist()
    ids[0] = None
    column = table.schema.get_field_index("annotation_id")
    pq.write_table(table.set_column(column, "annotation_id", pa.array(ids, pa.int64())), path)
    known = [i for i in pq.read_table(out / "keypoints").column("annotation_id").to_pylist() if i is not None]

    result = export(out, "--to", tmp_path / "d.json")
    assert result.exit_code == 0, result.output
    got = sorted(a["id"] for a in json.loads((tmp_path / "d.json").read_text())["annotations"])
    assert len(set(got)) == len(got) == len(known) + 1
    assert sorted(set(got) - set(known)) == [max(known) + 1]
