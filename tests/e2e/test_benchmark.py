"""The throughput benchmark in CI size: tiny preset, three small images twice over, all three rows, JSON written.

A smoke test of benchmarks/throughput.py (its figures are not asserted: timings on shared CI
machines mean nothing). It runs on the session's Ray, which the benchmark reuses. And one each
of benchmarks/dtype_drift.py, benchmarks/profile_pose.py and benchmarks/jpeg_decoders.py, in the same spirit.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import REPO

pytest.importorskip("transformers.models.vitpose.image_processing_pil_vitpose")
pytest.importorskip("scipy")

BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str = "throughput"):
    spec = importlib.util.spec_from_file_location(f"raypose_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_writes_all_rows(ray_session, tmp_path, capsys):
    bench = load_benchmark()
    json_path = tmp_path / "result.json"
    result = bench.main([
        "--preset", "tiny", "--images", "3", "--image-copies", "2", "--sizes", "320x240,240x320", "--persons", "1-2",
        "--batch-size", "4", "--device", "cpu", "--ceiling-min-seconds", "0.1",
        "--out", str(tmp_path / "bench"), "--json", str(json_path),
    ])
    rows = result["rows"]
    for name in ("reference", "ceiling", "raypose"):
        assert name in rows, name
        assert rows[name]["crops"] > 0 and rows[name]["crops_per_second"] > 0, (name, rows[name])
    assert rows["raypose"]["crops"] == rows["reference"]["crops"]  # same images and boxes
    assert rows["raypose"]["crops"] == result["inputs"]["crops"] and result["raypose"]["images"] == 6  # both copies
    assert rows["raypose"]["x_reference"] > 0 and rows["raypose"]["x_ceiling"] > 0
    assert result["raypose"]["errors"] == 0
    assert ray_session.is_initialized()  # the session's Ray was reused, not shut down
    by_process = result["raypose"]["cpu_seconds_by_process"]  # where the run's CPU went, by kind of process
    assert by_process["driver"] > 0 and by_process.get("actor pools (pose)", 0) > 0, by_process
    assert sum(by_process.values()) <= result["raypose"]["cpu_seconds_tree"] + 0.05 * len(by_process)

    written = json.loads(json_path.read_text())
    assert set(written["rows"]) >= {"reference", "ceiling", "raypose"}
    assert written["config"]["preset"] == "tiny" and written["config"]["batch_size"] == 4
    table = capsys.readouterr().out
    assert "reference" in table and "ceiling" in table and "x ceiling" in table
    assert "the forward alone at the ceiling's CPU-s per crop" in table


def test_dtype_drift_smoke(capsys):
    load_benchmark("dtype_drift").main(["--preset", "tiny", "--images", "2", "--peaks", "20"])
    out = capsys.readouterr().out
    assert "bfloat16 vs float32" in out and "heatmap noise" in out
    assert "peaked heatmaps + median noise" in out and "peaked heatmaps + p99 noise" in out


def test_profile_pose_smoke(capsys):
    load_benchmark("profile_pose").main(["--preset", "tiny", "--batch-size", "4", "--repeat", "1", "--device", "cpu",
                                         "--device-crops", "2"])
    out = capsys.readouterr().out
    for row in ("crops -> array", "estimate", "forward", "estimate_rows", "rows, no model", "plan_crops", "planned_images", "cut_on_device"):
        assert f"  {row} " in out, row
    assert "100.0% equal" in out  # on CPU the device path decodes with Pillow: the CPU stage's very crops


def test_jpeg_decoders_smoke_cpu_rows_are_pillow_exact(tmp_path, capsys):
    rows = load_benchmark("jpeg_decoders").main(["--images", "3", "--out", str(tmp_path)])
    assert [r["decoder"] for r in rows][:2] == ["pillow", "nvimgcodec cpu regions"]
    assert all(r["max"] == 0 and r["ms_per_image"] > 0 for r in rows[:2])  # the CPU's decoders: Pillow's pixels


def test_ceiling_in_processes_adds_their_rates(tiny_checkpoint):
    from types import SimpleNamespace

    from raypose.models.vitpose import inspect_model

    bench = load_benchmark()
    expert = SimpleNamespace(model=inspect_model(str(tiny_checkpoint)), dataset_index=None)
    pose = SimpleNamespace(device="cpu", dtype="float32", compile=False, flip_test=False)
    result = bench.run_ceiling(expert, pose, bs=2, n_crops=4, threads=1, min_seconds=0.1, processes=2)
    assert result["processes"] == 2 and result["threads"] == 1 and result["crops"] >= 8
    assert result["crops_per_second"] == pytest.approx(sum(result["crops_per_second_each"]), rel=0.01)


def test_image_copies_link_the_images_under_new_names_with_the_same_boxes(tmp_path):
    from raypose.testing.synthetic import make_benchmark_dataset

    bench = load_benchmark()
    manifest, boxes = make_benchmark_dataset(tmp_path, 2, sizes=((64, 48),), persons=(1, 3))
    repeated_manifest, repeated_boxes = bench.image_copies(tmp_path, manifest, boxes, 3)
    keys = repeated_manifest.read_text().split()
    original = json.loads(boxes.read_text())
    coco = json.loads(repeated_boxes.read_text())
    assert len(keys) == len(set(keys)) == 6 and keys[:2] == manifest.read_text().split()
    assert [image["file_name"] for image in coco["images"]] == keys
    copied_from = {key: key.split("/", 2)[2] if key.startswith("copies/") else key for key in keys}
    assert all((tmp_path / key).stat().st_ino == (tmp_path / copied_from[key]).stat().st_ino for key in keys)
    assert len(coco["annotations"]) == 3 * len(original["annotations"])
    assert len({ann["id"] for ann in coco["annotations"]}) == len(coco["annotations"])
    original_boxes, repeated = _boxes_by_name(original), _boxes_by_name(coco)
    assert {key: repeated[key] for key in keys} == {key: original_boxes[copied_from[key]] for key in keys}


def _boxes_by_name(coco: dict) -> dict[str, list]:
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    by_name: dict[str, list] = {}
    for ann in coco["annotations"]:
        by_name.setdefault(names[ann["image_id"]], []).append(ann["bbox"])
    return {name: sorted(boxes) for name, boxes in by_name.items()}
