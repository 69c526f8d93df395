"""The croppers without Ray; DeviceCropper: headers read in tasks, the decode and the cuts on the pose device."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import crop_options, image_task, task_table
from PIL import Image

from raypose.pipeline.crop_stage import make_crops, plan_crops
from raypose.pipeline.croppers import DeviceCropper
from raypose.schema import CROP_SCHEMA


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


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


def test_an_image_whose_rows_a_call_holds_only_some_of_fails_row_by_row_on_the_device(images):
    """Ray Data cuts planned rows into pose calls anywhere: each call must give the rows it holds, no fewer."""
    planned = plan_crops(task_table(
        image_task(images / "truncated.jpg", [[0, 0, 30, 30], [900, 0, 5, 5], [10, 10, 20, 20]], first_annotation=0),
        image_task(images / "photo.jpg", [[5, 5, 60, 90]], first_annotation=0),
    ), options=DEVICE_OPTIONS)
    calls = [planned.slice(0, 2), planned.slice(2)]
    got = [DeviceCropper(DEVICE_OPTIONS)(rows, torch.device("cpu"))[0].to_pylist() for rows in calls]
    assert [[(r["image_key"], r["instance_index"], r["error_stage"], r["image_rows"]) for r in rows] for rows in got] == [
        [("truncated.jpg", 0, "decode", 3), ("truncated.jpg", 1, "boxes", 3)],
        [("truncated.jpg", 2, "decode", 3), ("photo.jpg", 0, None, 1)]]
    assert got[0][0]["error_reason"].startswith("corrupt or truncated")


def test_crops_that_cannot_be_cut_on_the_device_become_error_rows(images, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("raypose.pipeline.croppers.cut_on_device", out_of_memory)
    rows, _ = on_device(task_table(
        image_task(images / "photo.jpg", [[5, 5, 60, 90], [float("nan"), 0.0, 5.0, 5.0]], first_annotation=0),
        image_task(images / "gone.jpg", [[0, 0, 5, 5]]),
    ))
    assert [(r["instance_index"], r["error_stage"], r["error_reason"]) for r in rows.to_pylist()] == [
        (0, "crop", "RuntimeError: CUDA out of memory"), (1, "boxes", rows.column("error_reason")[1].as_py()),
        (None, "read", "not found in storage"),
    ]


