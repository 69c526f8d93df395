"""The Dataset's blocks: bounded in images and boxes; an image with more boxes is cut into parts whose rows the writer
counts as one image's, whichever stage cuts its crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import image_task, job_dict, task_table

from raypose.config.spec import parse_job_spec
from raypose.output.writer import OutputStore, PartTarget, ShardWriter
from raypose.pipeline.blocks import image_blocks, in_parts
from raypose.pipeline.layout import ClusterShape, resolve_layout
from raypose.pipeline.plan import plan_job
from raypose.pipeline.stages import job_stages
from raypose.testing.synthetic import draw_people


def tasks_with(box_counts: list[int]) -> pa.Table:
    return task_table(*(image_task(Path(f"/data/img{i}.png"), [[i, j, 5, 5] for j in range(n)])
                        for i, n in enumerate(box_counts)))


def test_blocks_hold_at_most_so_many_images_and_boxes_in_order():
    tasks = tasks_with([3, 0, 2, 4, 1, 1, 1, 5, 0, 0])
    blocks = image_blocks(tasks, images_per_block=3, boxes_per_block=5)
    assert [b.column("image_key").to_pylist() for b in blocks] == [
        ["img0.png", "img1.png", "img2.png"], ["img3.png", "img4.png"], ["img5.png", "img6.png"],
        ["img7.png", "img8.png", "img9.png"]]
    assert pa.concat_tables(blocks).equals(tasks)  # uncut: the rows as they were, box_offset null


def test_an_image_with_more_boxes_than_a_block_is_cut_into_parts_of_its_own():
    tasks = tasks_with([2, 7, 1])
    tasks = tasks.set_column(tasks.schema.get_field_index("box_score"), "box_score",
                             pa.array([[0.5] * 2, [0.1 * j for j in range(7)], [0.9]], pa.list_(pa.float32())))
    cut = in_parts(tasks, 3)
    assert cut.column("image_key").to_pylist() == ["img0.png", "img1.png", "img1.png", "img1.png", "img2.png"]
    blocks = image_blocks(cut, images_per_block=16, boxes_per_block=3)  # a part is an image like any other
    assert [b.column("image_key").to_pylist() for b in blocks] == [
        ["img0.png"], ["img1.png"], ["img1.png"], ["img1.png", "img2.png"]]
    parts = cut.slice(1, 3).to_pylist()
    assert [(p["box_offset"], p["image_boxes"]) for p in parts] == [(0, 7), (3, 7), (6, 7)]
    assert [p["annotation_id"] for p in parts] == [[1, 2, 3], [4, 5, 6], [7]]
    assert [[b[1] for b in p["box_xywh"]] for p in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    np.testing.assert_allclose([s for p in parts for s in p["box_score"]], [0.1 * j for j in range(7)], rtol=1e-6)
    assert cut.column("box_offset").null_count == 2 and cut.column("image_boxes").null_count == 2


CROWD = 40  # boxes on one image
PER_TASK = 12  # boxes a block takes: the image is four parts


@pytest.fixture
def crowd_plan(tiny_checkpoint, tmp_path):
    """A 200x150 image with CROWD boxes (three of them invalid: box failure rows), and an image with two."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 90, (CROWD, 2))  # every box at least partly inside
    boxes = np.concatenate([xy, rng.uniform(20, 60, (CROWD, 2))], axis=1).round(1).tolist()
    boxes[5], boxes[17], boxes[30] = [0, 0, 0, 10], [900, 900, 5, 5], [10, 10, -4, 5]
    (tmp_path / "images").mkdir()
    draw_people(200, 150, np.array(boxes[:10])).save(tmp_path / "images" / "crowd.jpg")
    draw_people(100, 80, np.array([[5, 5, 30, 60]])).save(tmp_path / "images" / "a_pair.jpg")
    sets = [("crowd.jpg", (200, 150), boxes), ("a_pair.jpg", (100, 80), [[5, 5, 30, 60], [50, 10, 30, 60]])]
    coco = {"images": [{"id": i + 1, "file_name": name, "width": w, "height": h} for i, (name, (w, h), _) in enumerate(sets)],
            "annotations": [{"id": 1000 * (i + 1) + j, "image_id": i + 1, "category_id": 1, "bbox": box, "area": 100,
                             "iscrowd": 0} for i, (_, _, b) in enumerate(sets) for j, box in enumerate(b)],
            "categories": [{"id": 1, "name": "person"}]}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    spec = job_dict(tmp_path / "images", tmp_path / "boxes.json", tiny_checkpoint, tmp_path / "out",
                    resources={"boxes_per_crop_task": PER_TASK}, pose={"batch_size": 8})
    plan = plan_job(parse_job_spec(spec), run=True)  # writes its plan files: the tasks are read back from them
    yield plan
    plan.close()


def run_as_ray_data_would(stages, blocks: list[pa.Table], crops: list[int]) -> list[pa.Table]:
    """Each block through the stages: a task per block (a generator's tables each a block), then pose calls of
    the stage's batch size (rows cut into calls anywhere) or a block each; `crops` gets the crop rows each task
    table and each pose call's part made."""
    for stage in stages[:-1]:
        made = [stage.fn(block, **stage.fn_args) for block in blocks]
        blocks = [t for m in made for t in ([m] if isinstance(m, pa.Table) else list(m))]
        crops += [block.num_rows for block in blocks if block.column("crop").null_count < block.num_rows]  # pixels
    pose = stages[-1]
    actor, size = pose.fn(**pose.fn_args), pose.map_args["batch_size"]
    if size is not None:
        rows = pa.concat_tables(blocks)
        blocks = [rows.slice(i, size) for i in range(0, rows.num_rows, size)]
    crops += [actor.cropper(part, actor.device)[0].num_rows for block in blocks for part in actor.cropper.parts(block)]
    return [actor(block) for block in blocks]


@pytest.mark.parametrize("crop_in", ["tasks", "pose_actor", "pose_device"])
def test_a_crowded_image_goes_through_bounded_calls_and_the_writer_completes_it_once(crowd_plan, tmp_path, crop_in):
    plan = crowd_plan
    spec = plan.spec.model_copy(update={"resources": plan.spec.resources.model_copy(update={"crop_in": crop_in})})
    layout = resolve_layout(spec, plan.routing, ClusterShape(node_cpus=2), plan.images)
    tasks = in_parts(plan.read_tasks(), layout.boxes_per_task)  # as the plan's files are read
    assert tasks.num_rows == 5  # the other image, then the crowd's four parts
    blocks = [tasks.slice(i, layout.images_per_task) for i in range(0, tasks.num_rows, layout.images_per_task)]
    crops = []  # crop rows each crop task's table and each pose call's part made: never more than a part's boxes
    outputs = run_as_ray_data_would(job_stages(plan, layout), blocks, crops)
    assert max(crops) <= max(PER_TASK, layout.pose.batch_size) and max(crops) >= 8

    store = OutputStore(spec.output, {})
    target = PartTarget(output=spec.output, storage_options={}, job_id="j", models={"coco": ("m", "r")}, schemas={})
    writer = ShardWriter(store, target, shards={0: plan.shards.to_write[0]})
    for rows in outputs:
        writer.write(rows)
    assert 0 in writer.committed
    assert writer.images_done == 2 and writer.instances == CROWD - 3 + 2 and writer.errors == 3
    rows = pa.concat_tables(outputs)
    crowd = rows.filter(pa.compute.equal(rows.column("image_key"), "crowd.jpg"))
    assert sorted(crowd.column("instance_index").to_pylist()) == list(range(CROWD))
    assert set(crowd.column("image_rows").to_pylist()) == {CROWD}
    assert crowd.column("annotation_id").to_pylist() == [1000 + i for i in crowd.column("instance_index").to_pylist()]
