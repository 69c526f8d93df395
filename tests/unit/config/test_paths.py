"""Every path and checkpoint field found by one walker and resolved in one place."""

from __future__ import annotations

from raypose.config.paths import local_paths, path_fields, resolve_paths
from raypose.config.spec import load_job_spec


def raw_spec() -> dict:
    return {
        "images": {"path": "images"}, "boxes": {"path": "s3://bucket/boxes.json", "detector": {"model": "detr"}},
        "pose": {"model": "owner/hub-model", "experts": {"ap10k": {"model": "ap10k-model"}, "aic": {}}},
        "output": {"path": "./out/"},
    }


def test_the_walker_finds_every_path_and_checkpoint_field():
    assert [(f, c) for f, _, c in path_fields(raw_spec())] == [
        ("images.path", False), ("boxes.path", False), ("output.path", False),
        ("pose.model", True), ("pose.experts.ap10k.model", True), ("boxes.detector.model", True)]


def test_local_paths_resolve_and_hub_ids_and_urls_stay(tmp_path):
    (tmp_path / "ap10k-model").mkdir()
    (tmp_path / "detr").mkdir()
    raw = raw_spec()
    resolve_paths(raw, tmp_path)
    assert raw["images"]["path"] == str(tmp_path / "images")
    assert raw["output"]["path"] == str(tmp_path / "out")  # normalised: no trailing slash, no ./
    assert raw["boxes"]["path"] == "s3://bucket/boxes.json"
    assert raw["pose"]["model"] == "owner/hub-model"  # no such directory: a hub id
    assert raw["pose"]["experts"]["ap10k"]["model"] == str(tmp_path / "ap10k-model")
    assert raw["boxes"]["detector"]["model"] == str(tmp_path / "detr")


def test_expert_and_detector_checkpoints_resolve_against_the_job_file_like_pose_model(tmp_path, monkeypatch):
    job_dir = tmp_path / "jobs"
    for name in ("model", "ap10k-model", "detr"):
        (job_dir / name).mkdir(parents=True)
    job = job_dir / "job.yaml"
    job.write_text(
        "images: {path: images}\nboxes: {source: detector, detector: {model: detr}}\n"
        "pose: {model: model, routing: {dog: ap10k}, experts: {ap10k: {model: ap10k-model, keypoint_schema: ap10k17}}}\n"
        "output: {path: out}\n")
    monkeypatch.chdir(tmp_path)  # not the job's folder
    spec = load_job_spec(job)
    assert spec.pose.model == str(job_dir / "model")
    assert spec.pose.experts["ap10k"].model == str(job_dir / "ap10k-model")
    assert spec.boxes.detector.model == str(job_dir / "detr")


def test_local_paths_says_which_fields_name_this_machines_files(tmp_path):
    (tmp_path / "ap10k-model").mkdir()
    found = {field: relative for field, _, relative in local_paths(raw_spec(), tmp_path)}
    assert found == {"images.path": True, "output.path": True, "pose.experts.ap10k.model": True}
