"""The plan: a check writes nothing and looks at the first chunk; a run holds the lease and writes its shards'
plan files; listings and box tables that stop being sorted are read whole."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import job_dict

from raypose.config.spec import parse_job_spec
from raypose.output.lease import LeaseHeld
from raypose.pipeline import plan as plan_module
from raypose.pipeline.plan import plan_job


@pytest.fixture
def table_job(tiny_checkpoint, coco_folder, tmp_path):
    """The drawn COCO images with their boxes as a Parquet box table, sorted by key but for its last rows."""
    coco = json.loads((coco_folder / "boxes.json").read_text())
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    rows = sorted(({"image_key": names[a["image_id"]], "bbox": a["bbox"], "category": "person"}
                   for a in coco["annotations"]), key=lambda r: r["image_key"])
    rows.append(rows.pop(0))  # the first image's first box last: out of order after the first chunk
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "boxes.parquet")
    spec = job_dict(coco_folder / "images", tmp_path / "boxes.parquet", tiny_checkpoint, tmp_path / "out")
    spec["boxes"]["source"] = "table"
    spec["output"]["images_per_shard"] = 2
    return parse_job_spec(spec)


def test_a_check_writes_nothing_and_looks_at_the_first_chunk(table_job, tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "CHUNK_ROWS", 2)
    checked = plan_job(table_job)
    assert checked.lease is None and not (tmp_path / "out").exists()
    assert checked.counts["listing_complete"] is False and checked.counts["images_listed"] == 2


def test_a_run_holds_the_lease_and_writes_its_plan_files(table_job, tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "CHUNK_ROWS", 2)
    from raypose.inputs import boxes as boxes_module

    chunks = boxes_module._box_table_chunks
    monkeypatch.setattr(boxes_module, "_box_table_chunks", lambda source, path, spec: chunks(source, path, spec, 2))
    planned = plan_job(table_job, run=True)
    try:
        with pytest.raises(LeaseHeld):
            plan_job(table_job, run=True)
        # The box table stopped being sorted after its first chunk: read whole, the same boxes for every image.
        tasks = planned.read_tasks()
        assert planned.counts["listing_complete"] is True and planned.images == tasks.num_rows == 3
        assert sum(len(b) for b in tasks.column("box_xywh").to_pylist()) == planned.counts["boxes"] == 6
        assert sorted(p.name for p in (tmp_path / "out" / "_plan").iterdir()) == ["00000.parquet", "00001.parquet"]
    finally:
        planned.close()
    plan_job(table_job, run=True).close()  # released: the next run goes
