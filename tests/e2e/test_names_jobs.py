"""Names no one planned for, through `validate` and `submit`: bytes that are not UTF-8, glob characters, colons."""

from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow.parquet as pq
from conftest import job_dict, read_json
from typer.testing import CliRunner

from raypose.cli import app
from raypose.inputs.fetch import read_bytes

runner = CliRunner()


def test_job_over_a_folder_of_odd_names(ray_session, coco_folder, tiny_checkpoint, write_job, tmp_path):
    # A folder whose name is a glob, holding a Latin-1 name, a colon name and a name with glob characters;
    # the boxes file as Python writes it from os.listdir (the Latin-1 byte as the surrogate "\udce9").
    folder = tmp_path / "photos [2023]"
    folder.mkdir()
    renamed = {"img_0000.jpg": os.fsdecode(b"caf\xe9.jpg"), "img_0001.jpg": "co::lon.jpg", "img_0002.jpg": "star*[1].jpg"}
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
