"""Outputs that live across runs: one writer at a time, append runs over a growing folder, replaced images,
and overwrite that touches only raypose's own files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import job_dict, read_json
from typer.testing import CliRunner

from raypose.cli import app
from raypose.testing.synthetic import make_coco_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    """Eight drawn images (img_0000 ... img_0007, 1-2 people each) and their COCO boxes."""
    folder = tmp_path_factory.mktemp("growing")
    make_coco_dataset(folder, [(160 + 8 * i, 120 + 4 * i) for i in range(8)],
                      persons_per_image=[1 + i % 2 for i in range(8)], seed=5)
    return folder


def job_for(drawn: Path, images: Path, output: Path, tmp_path: Path, **output_fields) -> Path:
    spec = job_dict(images, images.parent / "boxes.json", "MODEL", output)
    spec["output"].update(images_per_shard=2, **output_fields)
    spec["pose"]["batch_size"] = 2
    job = tmp_path / f"job-{len(list(tmp_path.glob('job-*.yaml')))}.yaml"
    job.write_text(json.dumps(spec))
    return job


def submit(job: Path, checkpoint: Path, *args: str):
    return runner.invoke(app, ["submit", str(job), "--set", f"pose.model={checkpoint}", *args],
                         catch_exceptions=False)


def arrive(drawn: Path, images: Path, *indexes: int, coco: dict | None = None) -> None:
    """Images arrive in the folder, with their boxes (the boxes file beside the folder lists what is there)."""
    images.mkdir(exist_ok=True)
    for i in indexes:
        shutil.copy2(drawn / "images" / f"img_{i:04d}.jpg", images / f"img_{i:04d}.jpg")
    coco = coco or read_json(drawn / "boxes.json")
    present = {im["id"] for im in coco["images"] if (images / im["file_name"]).exists()}
    (images.parent / "boxes.json").write_text(json.dumps({
        **coco, "images": [im for im in coco["images"] if im["id"] in present],
        "annotations": [a for a in coco["annotations"] if a["image_id"] in present]}))


def instances(output: Path) -> list[tuple[str, int]]:
    files = sorted(str(f) for f in (output / "keypoints").glob("*.parquet"))
    table = pq.ParquetDataset(files).read(columns=["image_key", "instance_index"])
    return sorted(zip(table.column("image_key").to_pylist(), table.column("instance_index").to_pylist()))


def test_append_runs_label_what_is_new_and_relabel_what_changed(ray_session, drawn, tiny_checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    coco = read_json(drawn / "boxes.json")
    boxes_of = {im["file_name"]: sum(a["image_id"] == im["id"] for a in coco["annotations"]) for im in coco["images"]}
    arrive(drawn, images, 0, 2, 4, 6)
    first = submit(job_for(drawn, images, out, tmp_path), tiny_checkpoint)
    assert first.exit_code == 0, first.output
    kept = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "keypoints").iterdir()}
    assert len(list((out / "_shards").glob("*.json"))) == 2

    # Four new images: two whose keys sort between the old ones, two after every old key.
    arrive(drawn, images, 1, 3, 5, 7)
    job = job_for(drawn, images, out, tmp_path, mode="append")
    second = submit(job, tiny_checkpoint)
    assert second.exit_code == 0, second.output
    assert "8 images (4 this run)" in second.output.splitlines()[-1]
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "keypoints").iterdir()}
    assert {name: after[name] for name in kept} == kept  # the first run's files: byte-identical, untouched
    expected = sorted((k, i) for k, n in boxes_of.items() for i in range(n))
    assert instances(out) == expected  # every instance of the eight images, exactly once
    markers = [read_json(m) for m in sorted((out / "_shards").glob("*.json"))]
    assert [m["shard"] for m in markers] == [0, 1, 2, 3] and markers[2]["first_key"] == "img_0001.jpg"

    # Nothing new: nothing labelled, no shard written, each run recorded.
    started = time.monotonic()
    third = submit(job, tiny_checkpoint)
    assert third.exit_code == 0, third.output
    assert time.monotonic() - started < 30
    manifest = read_json(out / "manifest.json")
    assert manifest["shards"] == {"total": 4, "reused": 4, "written": 0} and manifest["runs"] == 3
    assert manifest["counts"]["images"] == 8 and manifest["counts"]["images_this_run"] == 0
    assert [r["mode"] for r in read_json(out / "_job.json")["runs"]] == ["error", "append", "append"]
    assert instances(out) == expected
    inspected = runner.invoke(app, ["inspect", str(out), "--json"])
    runs = json.loads(inspected.output)["runs"]
    assert [(r["mode"], r["images"], r["status"]) for r in runs] == [
        ("error", 4, "succeeded"), ("append", 4, "succeeded"), ("append", 0, "succeeded")]

    # An image replaced by a larger one: relabelled on resume, its old rows gone, no other shard rewritten.
    from PIL import Image

    before = {p.name: p.read_bytes() for p in (out / "keypoints").iterdir()}
    with Image.open(images / "img_0002.jpg") as small:
        small.resize((small.width * 2, small.height * 2)).save(images / "img_0002.jpg", quality=90)
    coco["images"][2].update(width=coco["images"][2]["width"] * 2, height=coco["images"][2]["height"] * 2)
    for ann in coco["annotations"]:
        if ann["image_id"] == 3:
            ann["bbox"] = [2 * v for v in ann["bbox"]]
    arrive(drawn, images, coco=coco)
    fourth = submit(job, tiny_checkpoint, "--resume")
    assert fourth.exit_code == 0, fourth.output
    assert instances(out) == expected
    table = pq.read_table(out / "keypoints").to_pylist()
    widths = {r["image_width"] for r in table if r["image_key"] == "img_0002.jpg"}
    assert widths == {coco["images"][2]["width"]}
    rewritten = [name for name, data in before.items() if not (out / "keypoints" / name).exists()]
    assert rewritten and all(name.startswith("shard-00000-") for name in rewritten)  # img_0002's old shard only
    assert read_json(out / "_shards" / "00000.json")["superseded"] == 1
    assert {r["job_id"] for r in table} >= {read_json(out / "_job.json")["job_id"]}


def test_one_run_writes_an_output_at_a_time(ray_session, drawn, tiny_checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    arrive(drawn, images, 0, 1)
    job = job_for(drawn, images, out, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fsspec, time; from raypose.output.lease import Lease; "
        f"Lease(fsspec.filesystem('file'), {str(out)!r}, 'nightly-holder', 'out').acquire(); "
        "print('held', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in ("submit", "validate"):
            refused = runner.invoke(app, [command, str(job), "--set", f"pose.model={tiny_checkpoint}"])
            assert refused.exit_code == 2, refused.output
            [line] = [line for line in refused.output.splitlines() if line.startswith("error:")]
            assert f"is being written by job nightly-holder (pid {holder.pid}" in line and "--break-lease" in line
        assert not (out / "_job.json").exists() and not (out / "_plan").exists()  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone (killed on this machine), the output is free at once.
    done = runner.invoke(app, ["validate", str(job), "--set", f"pose.model={tiny_checkpoint}"])
    assert done.exit_code == 0, done.output


def test_overwrite_removes_only_what_raypose_wrote(ray_session, drawn, tiny_checkpoint, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    arrive(drawn, images, 0, 1)
    (out / "keypoints").mkdir(parents=True)
    (out / "keypoints" / "notes.csv").write_text("the user's own")
    (out / "manifest.json").write_text('{"owner": "the data team"}')
    job = job_for(drawn, images, out, tmp_path, mode="overwrite")
    refused = submit(job, tiny_checkpoint)  # raypose would write its own manifest.json over theirs
    assert refused.exit_code == 2 and "holds manifest.json that raypose did not write" in refused.output
    (out / "manifest.json").unlink()
    assert submit(job, tiny_checkpoint).exit_code == 0
    assert submit(job, tiny_checkpoint).exit_code == 0  # a second overwrite replaces raypose's files only
    assert (out / "keypoints" / "notes.csv").read_text() == "the user's own"
    assert len(instances(out)) == 3
    # ...and an output that holds the images it reads is refused outright.
    inside = out / "keypoints"
    arrive(drawn, inside, 2)
    refused = submit(job_for(drawn, inside, out, tmp_path, mode="overwrite"), tiny_checkpoint)
    assert refused.exit_code == 2 and "is inside output.path" in refused.output
    assert (inside / "img_0002.jpg").exists() and (out / "keypoints" / "notes.csv").exists()
