"""`raypose inspect`: a job's summary from manifest.json and the Parquet, as text and as JSON."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from job_output import DOG_SCHEMA, shared_job
from typer.testing import CliRunner

from raypose.cli import app
from raypose.imaging.keypoint_schemas import SCHEMAS
from raypose.review.summary import SCORE_BINS

runner = CliRunner()


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory, coco_folder, tiny_checkpoint):
    return shared_job(tmp_path_factory, coco_folder, tiny_checkpoint)


def inspect(*args):
    return runner.invoke(app, ["inspect", *map(str, args)], env={"COLUMNS": "200"})


def expected_histogram(values: np.ndarray) -> list[int]:
    """Counts per score bin, computed independently: below 0 counts in the first bin, 1 and above in the last."""
    edges = np.array(SCORE_BINS, dtype=float)
    counts = np.histogram(np.clip(values, 0.0, 1.0), bins=edges)[0]  # numpy's last bin is closed: 1.0 lands in it
    return [int(c) for c in counts]


def test_inspect_json_matches_the_parquet(job):
    result = inspect(job.output, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)

    rows = pq.read_table(job.output / "keypoints").to_pylist()
    errors = pq.read_table(job.output / "errors").to_pylist()
    manifest = json.loads((job.output / "manifest.json").read_text())

    assert summary["job_id"] == manifest["job_id"] == rows[0]["job_id"]
    assert summary["status"] == "succeeded"
    assert summary["counts"] == {
        "images_with_instances": len({r["image_key"] for r in rows}),
        "instances": len(rows),
        "errors": len(errors),
    }
    assert summary["instances_by"]["category"] == {"person": 6, "dog": 1}
    assert summary["instances_by"]["expert"] == dict(Counter(r["expert"] for r in rows))
    assert summary["job_counts"]["instances"] == len(rows) and summary["job_counts"]["errors"] == len(errors)
    assert summary["errors_by_stage"] == dict(Counter(e["stage"] for e in errors))
    assert sum(e["count"] for e in summary["top_error_reasons"]) == len(errors)
    reasons = {(e["stage"], e["reason"]) for e in errors}
    assert {(e["stage"], e["reason"]) for e in summary["top_error_reasons"]} == reasons
    assert summary["warnings"] == []

    # experts and models from the manifest
    assert summary["experts"]["coco"]["model"] == rows[0]["model_id"]
    assert summary["experts"]["ap10k"]["keypoint_schema"] == DOG_SCHEMA
    assert summary["throughput"] == manifest["throughput"] and summary["seconds"] == manifest["seconds"]
    assert summary["spec"] == manifest["spec"]

    # per-schema, per-keypoint means and histograms
    assert sorted(summary["keypoint_scores"]) == sorted({"coco17", DOG_SCHEMA})
    for schema, stats in summary["keypoint_scores"].items():
        scores = np.array([r["keypoint_score"] for r in rows if r["keypoint_schema"] == schema])
        assert stats["instances"] == len(scores) and stats["bins"] == list(SCORE_BINS)
        assert [k["name"] for k in stats["keypoints"]] == list(SCHEMAS[schema].keypoints)
        for k, entry in enumerate(stats["keypoints"]):
            assert entry["mean"] == pytest.approx(scores[:, k].mean(), rel=1e-6)
            assert entry["histogram"] == expected_histogram(scores[:, k])
            assert sum(entry["histogram"]) == len(scores)
    instance_scores = np.array([r["instance_score"] for r in rows])
    assert summary["instance_score"]["mean"] == pytest.approx(instance_scores.mean(), rel=1e-6)
    assert summary["instance_score"]["median"] == pytest.approx(np.median(instance_scores), rel=1e-6)


def test_inspect_text_is_a_readable_table(job):
    result = inspect(job.output)
    assert result.exit_code == 0, result.output
    text = result.stdout
    summary = json.loads(inspect(job.output, "--json").stdout)
    manifest = json.loads((job.output / "manifest.json").read_text())
    assert text.splitlines()[0].startswith(f"job         {manifest['job_id']}  (succeeded)")
    for section in ("experts", "counts", "errors by stage", "top error reasons", "keypoint scores: coco17",
                    f"keypoint scores: {DOG_SCHEMA}", "spec (credentials redacted)"):
        assert section in text, section
    lines = text.splitlines()
    # counts: the manifest's and the Parquet's side by side
    assert ["instances", "7", "7"] in [line.split() for line in lines]
    assert ["errors", "3", "3"] in [line.split() for line in lines]
    # one row per keypoint: index, name, mean, then the five bin counts, which add up to the instances
    [nose] = [line for line in lines if line.split()[:2] == ["0", "nose"]]
    cells = nose.split()
    assert cells[2] == f"{summary['keypoint_scores']['coco17']['keypoints'][0]['mean']:.3f}"
    assert [int(c) for c in cells[3:]] == summary["keypoint_scores"]["coco17"]["keypoints"][0]["histogram"]
    assert sum(int(c) for c in cells[3:]) == 6
    for stage in summary["errors_by_stage"]:
        assert any(line.split()[:2] == [stage, str(summary["errors_by_stage"][stage])] for line in lines)
    assert "empty file (0 bytes)" in text
    assert manifest["experts"]["coco"]["revision"] in text
    assert "crops/s" in text and "images/s" in text
    # the redacted spec is shown, as YAML
    assert "pose:" in text and "routing:" in text


def test_inspect_a_url_and_an_unfinished_output(job, tmp_path):
    fs = fsspec.filesystem("memory")
    fs.put(str(job.output), "/inspect-test/out", recursive=True)
    try:
        result = inspect("memory://inspect-test/out", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["counts"]["instances"] == 7
    finally:
        fs.rm("/inspect-test", recursive=True)

    # no manifest.json: the job did not finish; the summary says so and counts what is on disk
    unfinished = tmp_path / "unfinished"
    shutil.copytree(job.output, unfinished)
    (unfinished / "manifest.json").unlink()
    (unfinished / "keypoint_schemas.json").unlink()  # the Parquet metadata names the keypoints too
    summary = json.loads(inspect(unfinished, "--json").stdout)
    assert summary["status"] == "incomplete" and summary["counts"]["instances"] == 7
    assert summary["keypoint_scores"]["coco17"]["keypoints"][0]["name"] == "nose"
    assert any("did not finish" in w for w in summary["warnings"])
    assert "did not finish" in inspect(unfinished).stdout


def test_inspect_says_when_the_manifest_and_the_parquet_disagree(job, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(job.output, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["counts"]["instances"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    summary = json.loads(inspect(out, "--json").stdout)
    assert summary["warnings"] == ["manifest says 8 instances, the Parquet holds 7"]


def test_inspect_refuses_what_is_not_an_output(tmp_path):
    result = inspect(tmp_path / "nowhere")
    assert result.exit_code == 2
    assert result.stdout == "" and result.stderr.startswith("error: OUTPUT: ")
    assert "not a raypose output" in result.stderr
