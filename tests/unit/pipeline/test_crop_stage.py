"""The crop stage without Ray: image rows -> crop rows, on the CPU (make_crops, CpuCropper) or the device (DeviceCropper)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import crop_options, image_task, task_table
from PIL import Image

from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.geometry import center_scale_from_boxes
from raypose.pipeline.crop_stage import (
    DeviceCropper,
    _single_block_images,
    binary_column,
    crop_array,
    make_crops,
    pixel_view,
    plan_crops,
    planned_images,
)
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


def test_pixel_view_is_the_images_pixels_without_a_copy():
    _single_block_images()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    view = pixel_view(image)
    assert view.shape == (90, 120, 4) and not view.flags.owndata
    np.testing.assert_array_equal(view[..., :3], np.asarray(image))
    center, scale = center_scale_from_boxes(np.array([10.0, 5.0, 60.0, 80.0]), (48, 64))
    np.testing.assert_array_equal(
        crop_image(view, center[0], scale[0], (48, 64)), crop_image(np.asarray(image), center[0], scale[0], (48, 64))
    )


def test_pixel_view_of_an_image_in_several_blocks_is_the_image():
    size = Image.core.get_block_size()
    Image.core.set_block_size(4096)  # a 120x90 RGB image (43 KB) then spans several blocks
    try:
        image = Image.new("RGB", (120, 90), (10, 20, 30))
        assert pixel_view(image) is image
    finally:
        Image.core.set_block_size(size)


def test_binary_column_holds_the_bytes_and_nulls_in_bounded_chunks():
    values = [np.arange(6, dtype=np.uint8).reshape(2, 3), None, np.zeros(0, np.uint8), np.full(4, 7, np.uint8), None]
    expected = [bytes(range(6)), None, b"", b"\x07" * 4, None]
    whole = binary_column(values)
    assert whole.type == pa.binary() and whole.num_chunks == 1 and whole.to_pylist() == expected
    chunked = binary_column(values, chunk_bytes=6)
    assert [len(c) for c in chunked.chunks] == [3, 2] and chunked.to_pylist() == expected
    assert binary_column([]).to_pylist() == [] and binary_column([None]).to_pylist() == [None]


def test_crop_array_is_the_rows_crops_whether_viewed_or_copied():
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (6, 4, 3, 3), dtype=np.uint8)
    values = [c.tobytes() for c in crops]
    values[4] = None  # a failed row
    column = pa.array(values, pa.binary()).slice(1)  # an offset into the buffers, as a Ray Data batch has
    view = crop_array(column, [0, 1, 2], (3, 4))
    assert not view.flags.owndata  # consecutive rows: the column's own bytes
    np.testing.assert_array_equal(view, crops[1:4])
    np.testing.assert_array_equal(crop_array(column, [0, 2, 4], (3, 4)), crops[[1, 3, 5]])
    np.testing.assert_array_equal(crop_array(column, [2, 4], (3, 4)), crops[[3, 5]])  # a null row between


# --- DeviceCropper: headers here, the decode and the cuts on the pose device -----------------------

SIZES = {"coco": (192, 256), "ap10k": (256, 256)}
DEVICE_OPTIONS = crop_options(SIZES, {"dog": "ap10k"}, max_pixels=10**8)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    (tmp_path / "photo.jpg").write_bytes(encode(Image.fromarray(rng.integers(0, 256, (131, 97, 3), dtype=np.uint8)),
                                                "JPEG", quality=90))
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])  # a whole header, half the pixels
    return tmp_path


def on_device(batch: pa.Table):
    return DeviceCropper(DEVICE_OPTIONS)(plan_crops(batch, options=DEVICE_OPTIONS), torch.device("cpu"))


def cpu_crop(row: dict) -> np.ndarray:
    width, height = SIZES[row["expert"]]
    return np.frombuffer(row["crop"], np.uint8).reshape(height, width, 3)


def test_device_crops_equal_the_cpu_stage(images):
    batch = task_table(
        image_task(images / "noise.png", [[10, 20, 50, 80], [-20, 100, 60, 40], [500, 500, 10, 10], [30, 30, 40, 40]],
                   categories=["person", "person", "person", "dog"], first_annotation=0),
        image_task(images / "photo.jpg", [[0, 0, 97, 131], [40, 50, 20, 30]], categories=["dog", "person"],
                   first_annotation=0),
        image_task(images / "missing.jpg", [[0, 0, 5, 5]], first_annotation=0),
    )
    expected = make_crops(batch, options=DEVICE_OPTIONS)
    table, pick = on_device(batch)
    assert table.select(CROP_SCHEMA.names).drop_columns(["crop"]).equals(expected.drop_columns(["crop"]))
    rows = expected.to_pylist()
    good = [i for i, row in enumerate(rows) if row["error_stage"] is None]
    assert len(good) == 5
    for i in good:  # the same sampling points and float32 arithmetic: the same bytes
        np.testing.assert_array_equal(pick([i], SIZES[rows[i]["expert"]])[0].numpy(), cpu_crop(rows[i]))
    coco = [i for i in reversed(good) if rows[i]["expert"] == "coco"]
    np.testing.assert_array_equal(pick(coco, SIZES["coco"]).numpy(), np.stack([cpu_crop(rows[i]) for i in coco]))


def test_planned_crops_cut_the_same_however_the_rows_are_batched_again(images):
    """Ray Data joins the tasks' blocks and cuts them into pose batches anywhere, through an image's crops."""
    first = task_table(image_task(images / "noise.png", [[10, 20, 50, 80], [30, 30, 40, 40], [60, 10, 30, 90]],
                                  first_annotation=0))
    second = task_table(image_task(images / "photo.jpg", [[0, 0, 97, 131], [40, 50, 20, 30]], first_annotation=0),
                        dict(image_task(images / "noise.png", [[5, 5, 90, 60]], first_annotation=0), image_key="again.png"))
    expected = pa.concat_tables([make_crops(first, options=DEVICE_OPTIONS), make_crops(second, options=DEVICE_OPTIONS)])
    planned = pa.concat_tables([plan_crops(first, options=DEVICE_OPTIONS), plan_crops(second, options=DEVICE_OPTIONS)])
    assert planned.column("source").num_chunks == 2
    joined = planned.combine_chunks()  # one dictionary: the two blocks' unified (the same file's bytes once)
    assert len(joined.column("source").chunk(0).dictionary) == 2
    for rows, at in ((planned, 0), (joined.slice(1, 4), 1), (planned.slice(2, 4), 2)):
        images_here = planned_images(rows)
        assert sorted(r for image in images_here for r in image.rows) == list(range(rows.num_rows))
        _, pick = DeviceCropper(DEVICE_OPTIONS)(rows, torch.device("cpu"))
        for i, row in enumerate(expected.slice(at, rows.num_rows).to_pylist()):
            np.testing.assert_array_equal(pick([i], SIZES["coco"])[0].numpy(), cpu_crop(row))


def test_device_crops_from_a_jpeg_region_equal_the_cpu_stage_from_pillow(tmp_path, monkeypatch):
    import raypose.imaging.decode_device as decode_device
    from raypose.imaging.jpeg_region import region_decoder_available

    if not region_decoder_available():
        pytest.skip("nvImageCodec is not installed")
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    (tmp_path / "wide.jpg").write_bytes(encode(Image.fromarray(pixels), "JPEG", quality=85))
    regions = []
    real = decode_device.decode_jpeg_region
    monkeypatch.setattr(decode_device, "decode_jpeg_region", lambda data, region: regions.append(region) or real(data, region))
    batch = task_table(image_task(tmp_path / "wide.jpg", [[200, 150, 40, 60], [250, 120, 30, 70]], first_annotation=0))
    expected = make_crops(batch, options=replace(DEVICE_OPTIONS, region_decode=False)).to_pylist()
    table, pick = on_device(batch)
    [(x0, y0, x1, y1)] = regions  # only the corner the crops read was decoded
    assert x0 > 0 and y0 > 0 and (x1 - x0) * (y1 - y0) < 0.5 * 320 * 240
    for i, row in enumerate(expected):
        np.testing.assert_array_equal(pick([i], SIZES["coco"])[0].numpy(), cpu_crop(row))
    np.testing.assert_array_equal(pick([1, 0], SIZES["coco"]).numpy(), np.stack([cpu_crop(expected[1]), cpu_crop(expected[0])]))


def test_an_image_that_fails_to_decode_on_the_device_becomes_one_error_row(images):
    batch = task_table(
        image_task(images / "truncated.jpg", [[0, 0, 30, 30], [900, 0, 5, 5], [10, 10, 20, 20]], first_annotation=0),
        image_task(images / "photo.jpg", [[5, 5, 60, 90]], first_annotation=0),
    )
    expected = make_crops(batch, options=DEVICE_OPTIONS).to_pylist()
    table, pick = on_device(batch)
    got = table.select(CROP_SCHEMA.names).to_pylist()
    order = lambda r: (r["image_key"], r["instance_index"] or -1)  # noqa: E731
    assert sorted(got, key=order) == sorted([dict(r, crop=None) for r in expected], key=order)
    [failure] = [r for r in got if r["image_key"] == "truncated.jpg"]
    assert failure["error_stage"] == "decode" and failure["error_reason"].startswith("corrupt or truncated")
    assert failure["image_rows"] == 1 and failure["instance_index"] is None
    [photo] = [i for i, r in enumerate(got) if r["image_key"] == "photo.jpg"]
    np.testing.assert_array_equal(pick([photo], SIZES["coco"])[0].numpy(),
                                  cpu_crop(next(r for r in expected if r["image_key"] == "photo.jpg")))


def test_crops_that_cannot_be_cut_on_the_device_become_error_rows(images, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("raypose.pipeline.crop_stage.cut_on_device", out_of_memory)
    rows, _ = on_device(task_table(
        image_task(images / "photo.jpg", [[5, 5, 60, 90], [float("nan"), 0.0, 5.0, 5.0]], first_annotation=0),
        image_task(images / "gone.jpg", [[0, 0, 5, 5]]),
    ))
    assert [(r["instance_index"], r["error_stage"], r["error_reason"]) for r in rows.to_pylist()] == [
        (0, "crop", "RuntimeError: CUDA out of memory"), (1, "boxes", rows.column("error_reason")[1].as_py()),
        (None, "read", "not found in storage"),
    ]


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
