"""Names no one planned for, through `validate` and `submit`: bytes that are not UTF-8, glob characters, colons;
and every member of a WebDataset tar accounted for."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import pyarrow.parquet as pq
from helpers import coco_boxes_by_image, job_dict, read_json
from typer.testing import CliRunner

from raypose.cli import app
from raypose.inputs.fetch import read_bytes

runner = CliRunner()


def test_job_over_a_folder_of_odd_names(ray_session, coco_folder, tiny_checkpoint, write_job, tmp_path):
    # A folder whose name is a glob, holding a Latin-1 name, a colon name and a name with glob characters;
    # the boxes file as Python writes it from os.listdir (the Latin-1 byte as the surrogate "\udce9").
    folder = tmp_path / "photos [2023]"
    folder.mkdir()
    renamed = {"img_0000.jpg": os.fsdecode(b"caf\xe9.jpg"), "img_0001.jpg": "co::lon.jpg",
               "img_0002.jpg": "star*[1].jpg"}
    for old, new in renamed.items():
        with open(os.fsencode(folder) + b"/" + os.fsencode(new), "wb") as f:
            f.write((coco_folder / "images" / old).read_bytes())
    coco = read_json(coco_folder / "boxes.json")
    for image in coco["images"]:
        image["file_name"] = renamed[image["file_name"]]
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    job = write_job(job_dict(folder, tmp_path / "boxes.json", tiny_checkpoint, tmp_path / "out"))

    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 0 and result.stdout.startswith("ok: 3 images (3 with boxes"), result.output
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 0, result.output

    rows = pq.read_table(tmp_path / "out" / "keypoints").to_pylist()
    as_keyed = {new.replace("\udce9", "%E9"): new for new in renamed.values()}
    names = {image["id"]: renamed[image["file_name"]] for image in read_json(coco_folder / "boxes.json")["images"]}
    boxes = Counter(names[a["image_id"]] for a in read_json(coco_folder / "boxes.json")["annotations"])
    assert Counter(as_keyed[r["image_key"]] for r in rows) == boxes
    assert pq.read_table(tmp_path / "out" / "errors").num_rows == 0
    for row in rows:  # each row's image_uri reads the bytes the job labelled
        with open(os.fsencode(folder) + b"/" + os.fsencode(as_keyed[row["image_key"]]), "rb") as f:
            assert read_bytes(row["image_uri"], {}) == f.read()


def test_webdataset_job_accounts_for_every_member(ray_session, coco_folder, tiny_checkpoint, write_job, tmp_path):
    boxes = coco_boxes_by_image(coco_folder)
    assert [len(boxes[f"img_000{i}.jpg"]) for i in range(3)] == [2, 1, 3]
    image = {name: (coco_folder / "images" / name).read_bytes() for name in boxes}
    latin1 = os.fsdecode(b"caf\xe9.jpg")
    members = [
        ("s", tarfile.DIRTYPE, b"", ""),
        ("s/a.jpg", tarfile.REGTYPE, b"an earlier a.jpg, replaced", ""),
        ("s/a.jpg", tarfile.REGTYPE, image["img_0000.jpg"], ""),
        ("s/a.png", tarfile.REGTYPE, image["img_0001.jpg"], ""),  # the same stem: an image too
        ("s/a.json", tarfile.REGTYPE, json.dumps({"bbox": boxes["img_0000.jpg"]}).encode(), ""),
        (f"s/{latin1}", tarfile.REGTYPE, image["img_0002.jpg"], ""),
        (f"s/{latin1[:-4]}.json", tarfile.REGTYPE, json.dumps({"bbox": boxes["img_0002.jpg"]}).encode(), ""),
        ("s/hard.jpg", tarfile.LNKTYPE, b"", f"s/{latin1}"),
        ("s/hard.json", tarfile.LNKTYPE, b"", "s/a.json"),
        ("s/soft.jpg", tarfile.SYMTYPE, b"", "a.jpg"),
    ]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "shard-0000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data), link
            tar.addfile(info, io.BytesIO(data))
    spec = job_dict(tmp_path / "shards", "", tiny_checkpoint, tmp_path / "out", limits={"max_errored_fraction": 0.5})
    spec["images"]["format"], spec["boxes"] = "webdataset", {"source": "inline"}
    job = write_job(spec)

    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: 4 images (4 with boxes, 0 without), 9 boxes"), result.output
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 0, result.output

    rows = pq.read_table(tmp_path / "out" / "keypoints").to_pylist()
    per_image = Counter(r["image_key"] for r in rows)
    # a.png: sample s/a's other image, with a.json's boxes; hard.jpg: the Latin-1 image, with a.json's boxes
    assert per_image == {"s/a.jpg": 2, "s/a.png": 2, "s/caf%E9.jpg": 3, "s/hard.jpg": 2}
    assert {r["image_width"] for r in rows if r["image_key"] == "s/hard.jpg"} == \
        {r["image_width"] for r in rows if r["image_key"] == "s/caf%E9.jpg"}
    errors = {r["image_key"]: r for r in pq.read_table(tmp_path / "out" / "errors").to_pylist()}
    assert sorted(errors) == ["s/a.jpg", "s/soft.jpg"]
    assert {r["stage"] for r in errors.values()} == {"list"}
    assert "followed by another of the same name" in errors["s/a.jpg"]["reason"]
    assert "symbolic link" in errors["s/soft.jpg"]["reason"]
    counts = read_json(tmp_path / "out" / "manifest.json")["counts"]
    assert (counts["tar_directories"], counts["tar_other_members"], counts["errors_by_stage"]) == (1, 0, {"list": 2})
