"""The device crop plan's Arrow encoding: each crop row carries its image's bytes, read back however Ray Data re-batches the rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import crop_options, image_task, task_table
from PIL import Image

from raypose.pipeline.crop_sources import planned_images
from raypose.pipeline.crop_stage import make_crops, plan_crops
from raypose.pipeline.croppers import DeviceCropper

SIZE = (192, 256)
OPTIONS = crop_options({"coco": SIZE}, max_pixels=10**8)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    Image.fromarray(rng.integers(0, 256, (131, 97, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg", quality=90)
    return tmp_path


def cpu_crop(row: dict) -> np.ndarray:
    return np.frombuffer(row["crop"], np.uint8).reshape(SIZE[1], SIZE[0], 3)


def test_planned_crops_cut_the_same_however_the_rows_are_batched_again(images):
    """Ray Data joins the tasks' blocks and cuts them into pose batches anywhere, through an image's crops."""
    first = task_table(image_task(images / "noise.png", [[10, 20, 50, 80], [30, 30, 40, 40], [60, 10, 30, 90]],
                                  first_annotation=0))
    second = task_table(image_task(images / "photo.jpg", [[0, 0, 97, 131], [40, 50, 20, 30]], first_annotation=0),
                        dict(image_task(images / "noise.png", [[5, 5, 90, 60]], first_annotation=0), image_key="again.png"))
    expected = pa.concat_tables([make_crops(first, options=OPTIONS), make_crops(second, options=OPTIONS)])
    planned = pa.concat_tables([plan_crops(first, options=OPTIONS), plan_crops(second, options=OPTIONS)])
    assert planned.column("source").num_chunks == 2
    joined = planned.combine_chunks()  # one dictionary: the two blocks' unified (the same file's bytes once)
    assert len(joined.column("source").chunk(0).dictionary) == 2
    for rows, at in ((planned, 0), (joined.slice(1, 4), 1), (planned.slice(2, 4), 2)):
        images_here = planned_images(rows)
        assert sorted(r for image in images_here for r in image.rows) == list(range(rows.num_rows))
        _, pick = DeviceCropper(OPTIONS)(rows, torch.device("cpu"))
        for i, row in enumerate(expected.slice(at, rows.num_rows).to_pylist()):
            np.testing.assert_array_equal(pick([i], SIZE)[0].numpy(), cpu_crop(row))


