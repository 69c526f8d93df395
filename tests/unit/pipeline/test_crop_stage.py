"""The crop stage without Ray: image rows -> crop rows, their pixels cut on the CPU (make_crops) or left to the device (plan_crops)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import crop_options, image_task, task_table
from PIL import Image

from raypose.pipeline.crop_stage import make_crops
from raypose.schema import CROP_SCHEMA, IMAGE_TASK_SCHEMA

MAX_PIXELS = 1_000_000
INPUT_SIZE = (192, 256)  # (width, height)
OPTIONS = crop_options({"coco": INPUT_SIZE}, max_pixels=MAX_PIXELS)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def task(folder: Path, name: str, boxes: list[list[float]], size=(160, 120)) -> dict:
    return image_task(folder / name, boxes, size=size, first_annotation=100)


@pytest.fixture
def crop_inputs(tmp_path):
    rng = np.random.default_rng(1)
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(good)  # 160x120
    (tmp_path / "empty.jpg").write_bytes(b"")
    jpeg = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return tmp_path


def test_make_crops_outcomes(crop_inputs):
    nan = float("nan")
    boxes = [
        [10, 20, 50, 80],  # 0 inside
        [nan, 0, 10, 10],  # 1 NaN
        [5, 5, 0, 10],  # 2 zero width
        [5, 5, 10, -3],  # 3 negative height
        [500, 500, 10, 10],  # 4 fully outside
        [-20, 100, 60, 40],  # 5 partly outside: clipped to [0, 100, 40, 20]
    ]
    batch = pa.Table.from_pylist(
        [
            task(crop_inputs, "good.png", boxes),
            task(crop_inputs, "missing.jpg", [[0, 0, 10, 10]]),
            task(crop_inputs, "empty.jpg", [[0, 0, 10, 10]]),
            task(crop_inputs, "truncated.jpg", [[0, 0, 10, 10]], size=(64, 64)),
            task(crop_inputs, "good.png", [[0, 0, 10, 10]], size=(320, 240)),  # wrong expected size
            task(crop_inputs, "good.png", [[0, 0, 10, 10]], size=None),  # size unknown: not checked
        ],
        schema=IMAGE_TASK_SCHEMA,
    )
    out = make_crops(batch, options=OPTIONS)
    crop_bytes = 256 * 192 * 3
    assert out.schema.field("crop").type == pa.binary()
    got = out.to_pylist()
    assert len(got) == 6 + 4 + 1
    by_box = got[:6]

    for row, index in ((by_box[0], 0), (by_box[5], 5)):
        assert row["error_stage"] is None and row["error_reason"] is None
        assert row["crop"] is not None and len(row["crop"]) == crop_bytes
        assert (row["image_width"], row["image_height"]) == (160, 120)
        assert row["instance_index"] == index and row["annotation_id"] == 100 + index
        assert row["category"] == "person" and row["box_source"] == "gt" and row["expert"] == "coco"
        assert len(row["center"]) == 2 and len(row["scale"]) == 2
    assert by_box[0]["bbox"] == [10, 20, 50, 80]
    assert by_box[0]["center"] == [35, 60]
    assert by_box[5]["bbox"] == [0, 100, 40, 20]  # clipped, and cropped around the clipped box
    assert by_box[5]["center"] == [20, 110]
    crop = np.frombuffer(by_box[0]["crop"], np.uint8).reshape(256, 192, 3)
    assert crop.std() > 10  # sampled from the noise image, not blank

    expected_box_errors = {
        1: "non-finite coordinate",
        2: "zero or negative size",
        3: "zero or negative size",
        4: "lies outside the 160x120 image",
    }
    for index, reason in expected_box_errors.items():
        row = by_box[index]
        assert row["instance_index"] == index
        assert row["error_stage"] == "boxes" and reason in row["error_reason"]
        assert row["crop"] is None and row["bbox"] is None
        assert (row["image_width"], row["image_height"]) == (160, 120)

    failures = {row["image_key"]: row for row in got[6:10]}
    assert failures["missing.jpg"]["error_stage"] == "read"
    assert failures["missing.jpg"]["error_reason"] == "not found in storage"
    assert failures["empty.jpg"]["error_stage"] == "decode"
    assert failures["empty.jpg"]["error_reason"] == "empty file (0 bytes)"
    assert failures["truncated.jpg"]["error_stage"] == "decode"
    assert failures["truncated.jpg"]["error_reason"].startswith("corrupt or truncated")
    size_row = got[9]
    assert size_row["image_key"] == "good.png"
    assert size_row["error_stage"] == "decode"
    assert size_row["error_reason"] == "image is 160x120 but the boxes file says 320x240"
    for row in got[6:10]:
        assert row["crop"] is None and row["instance_index"] is None and row["bbox"] is None

    unchecked = got[10]
    assert unchecked["error_stage"] is None and len(unchecked["crop"]) == crop_bytes
    # A pose actor decodes and cuts several images at once: the same rows, in the same order.
    assert make_crops(batch, options=OPTIONS, threads=3).equals(out)


@pytest.mark.parametrize("threads", [1, 2])
def test_an_unforeseen_crop_failure_costs_only_its_image(crop_inputs, monkeypatch, threads):
    import raypose.pipeline.crop_stage as crop_stage

    cut = crop_stage.crop_image

    def crop_image(image, center, scale, input_size, **kwargs):
        if center[0] > 100:  # the second box of the first image
            raise MemoryError("no room")
        return cut(image, center, scale, input_size, **kwargs)

    monkeypatch.setattr(crop_stage, "crop_image", crop_image)
    batch = pa.Table.from_pylist(
        [task(crop_inputs, "good.png", [[10, 20, 50, 80], [110, 20, 40, 80]]), task(crop_inputs, "good.png", [[0, 0, 10, 10]])],
        schema=IMAGE_TASK_SCHEMA,
    )
    got = make_crops(batch, options=OPTIONS, threads=threads).to_pylist()
    assert [(r["instance_index"], r["error_stage"], r["error_reason"], r["image_rows"]) for r in got] == [
        (None, "crop", "MemoryError: no room", 1), (0, None, None, 1)]
    assert got[1]["crop"] is not None


def test_make_crops_empty_batch():
    out = make_crops(IMAGE_TASK_SCHEMA.empty_table(), options=OPTIONS)
    assert out.num_rows == 0
    assert out.schema == CROP_SCHEMA


def test_make_crops_routes_categories_to_experts_at_their_input_size(crop_inputs):
    boxes = [[10, 20, 50, 80], [30, 30, 40, 40], [0, 0, 20, 20]]
    row = task(crop_inputs, "good.png", boxes)
    row["category"] = ["person", "dog", None]
    options = crop_options({"coco": (192, 256), "ap10k": (256, 256)}, {"dog": "ap10k"}, max_pixels=MAX_PIXELS)
    got = make_crops(task_table(row), options=options).to_pylist()
    assert [r["expert"] for r in got] == ["coco", "ap10k", "coco"]
    assert [len(r["crop"]) for r in got] == [256 * 192 * 3, 256 * 256 * 3, 256 * 192 * 3]


def test_make_crops_passes_an_earlier_stage_failure_and_skips_imageless_boxes(crop_inputs):
    failed = task(crop_inputs, "good.png", [])
    failed.update(error_stage="detect", error_reason="RuntimeError: boom")
    nothing = task(crop_inputs, "good.png", [])  # e.g. the detector found nobody
    got = make_crops(pa.Table.from_pylist([failed, nothing], schema=IMAGE_TASK_SCHEMA), options=OPTIONS).to_pylist()
    # The image with nothing to label still leaves one empty row, so the writer knows it is done.
    assert [(r["error_stage"], r["error_reason"], r["crop"], r["image_rows"]) for r in got] == [
        ("detect", "RuntimeError: boom", None, 1), (None, None, None, 1)]


def test_region_decoded_crops_equal_the_full_decode_crops(tmp_path, monkeypatch):
    import raypose.pipeline.crop_stage as crop_stage

    rng = np.random.default_rng(5)
    pixels = np.clip(np.mgrid[0:300, 0:400][1][..., None] * 0.6 + rng.integers(0, 60, (300, 400, 3)), 0, 255)
    for subsampling in (0, 2):
        (tmp_path / f"photo{subsampling}.jpg").write_bytes(
            encode(Image.fromarray(pixels.astype(np.uint8)), "JPEG", quality=90, subsampling=subsampling))
    # People in the lower right quarter (a region decode), and a spread that spans the frame (Pillow's).
    corner = [[250, 180, 30, 60], [330, 200, 50, 70], [390, 290, 40, 40], [500, 0, 5, 5]]
    spread = [[10, 10, 30, 60], [350, 220, 40, 70]]
    batch = task_table(*(image_task(tmp_path / f"photo{s}.jpg", boxes, size=(400, 300), first_annotation=0)
                         for s in (0, 2) for boxes in (corner, spread)))
    regions = []

    def counted(data, region):
        regions.append(region)
        return real(data, region)

    real = crop_stage.decode_jpeg_region
    monkeypatch.setattr(crop_stage, "decode_jpeg_region", counted)
    by_region = make_crops(batch, options=OPTIONS)
    monkeypatch.setattr(crop_stage, "decode_jpeg_region", lambda data, region: None)
    by_pillow = make_crops(batch, options=OPTIONS)
    assert by_region.equals(by_pillow)
    assert len(regions) == 2 and all((x1 - x0) * (y1 - y0) <= 0.5 * 400 * 300 for x0, y0, x1, y1 in regions)
    assert by_region.column("crop").null_count == 2  # the box outside the image, in each photo


def test_a_part_of_an_image_that_fails_gives_a_row_per_box_and_counts_the_whole_image(crop_inputs):
    """The writer counts an image's rows over all its parts (blocks.image_parts): each part gives the rows it owes."""
    from raypose.pipeline.blocks import image_parts

    boxes = [[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]]
    whole = task_table(task(crop_inputs, "truncated.jpg", boxes, size=(64, 64)))
    parts = image_parts(whole, 2)
    got = [make_crops(part, options=OPTIONS).to_pylist() for part in parts]
    assert [[(r["instance_index"], r["error_stage"], r["image_rows"]) for r in rows] for rows in got] == [
        [(0, "decode", 3), (1, "decode", 3)], [(2, "decode", 3)]]
    assert got[0][0]["error_reason"].startswith("corrupt or truncated")
    # Uncut, the same image is one error row.
    assert [(r["instance_index"], r["image_rows"]) for r in make_crops(whole, options=OPTIONS).to_pylist()] == [(None, 1)]
    good = [make_crops(part, options=OPTIONS) for part in image_parts(task_table(task(crop_inputs, "good.png", boxes)), 2)]
    assert pa.concat_tables(good).drop_columns(["image_rows"]).equals(
        make_crops(task_table(task(crop_inputs, "good.png", boxes)), options=OPTIONS).drop_columns(["image_rows"]))
