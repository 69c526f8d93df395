"""device_crops: crops cut on the pose device equal the CPU stage's, failures included."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from raypose.crops import make_crops, plan_crops
from raypose.device_crops import cut_crops, decode_on_device, gpu_jpeg_decoder
from raypose.reader import read_images
from raypose.table import IMAGE_TASK_SCHEMA

SIZES = {"coco": (192, 256), "ap10k": (256, 256)}
ARGS = dict(input_sizes=SIZES, routes={"dog": "ap10k"}, default_expert="coco", storage_options={}, max_pixels=10**8)


def task(path, boxes, categories=None) -> dict:
    return {
        "image_key": path.name, "image_uri": path.as_uri(), "box_xywh": boxes,
        "annotation_id": list(range(len(boxes))), "category": categories or ["person"] * len(boxes),
        "box_score": [None] * len(boxes), "box_source": "gt",
    }


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(3)
    noise = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(noise)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(Image.fromarray(rng.integers(0, 256, (131, 97, 3), dtype=np.uint8))))
    data = jpeg(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])  # a whole header, half the pixels
    return tmp_path


def on_device(batch: pa.Table, device: str = "cpu"):
    rows, pending = plan_crops(read_images(batch, storage_options={}), **ARGS)
    return cut_crops(rows, pending, torch.device(device), ARGS["max_pixels"])


def cpu_crop(row: dict) -> np.ndarray:
    width, height = SIZES[row["expert"]]
    return np.frombuffer(row["crop"], np.uint8).reshape(height, width, 3)


def test_device_crops_equal_the_cpu_stage(images):
    batch = pa.Table.from_pylist([
        task(images / "noise.png", [[10, 20, 50, 80], [-20, 100, 60, 40], [500, 500, 10, 10], [30, 30, 40, 40]],
             ["person", "person", "person", "dog"]),
        task(images / "photo.jpg", [[0, 0, 97, 131], [40, 50, 20, 30]], ["dog", "person"]),
        task(images / "missing.jpg", [[0, 0, 5, 5]]),
    ], schema=IMAGE_TASK_SCHEMA)
    expected = make_crops(batch, **ARGS)
    table, pick = on_device(batch)
    assert table.drop_columns(["crop"]).equals(expected.drop_columns(["crop"]))
    rows = expected.to_pylist()
    good = [i for i, row in enumerate(rows) if row["error_stage"] is None]
    assert len(good) == 5
    for i in good:  # the same sampling points and float32 arithmetic: the same bytes
        np.testing.assert_array_equal(pick([i], SIZES[rows[i]["expert"]])[0].numpy(), cpu_crop(rows[i]))
    coco = [i for i in reversed(good) if rows[i]["expert"] == "coco"]
    np.testing.assert_array_equal(pick(coco, SIZES["coco"]).numpy(), np.stack([cpu_crop(rows[i]) for i in coco]))


def test_an_image_that_fails_to_decode_becomes_one_error_row(images):
    batch = pa.Table.from_pylist([
        task(images / "truncated.jpg", [[0, 0, 30, 30], [900, 0, 5, 5], [10, 10, 20, 20]]),
        task(images / "photo.jpg", [[5, 5, 60, 90]]),
    ], schema=IMAGE_TASK_SCHEMA)
    expected = make_crops(batch, **ARGS).to_pylist()
    table, pick = on_device(batch)
    got = table.to_pylist()
    key = lambda r: (r["image_key"], r["instance_index"])  # noqa: E731
    assert sorted(got, key=lambda r: (r["image_key"], r["instance_index"] or -1)) == sorted(
        [dict(r, crop=None) for r in expected], key=lambda r: (r["image_key"], r["instance_index"] or -1))
    [failure] = [r for r in got if r["image_key"] == "truncated.jpg"]
    assert failure["error_stage"] == "decode" and failure["error_reason"].startswith("corrupt or truncated")
    assert failure["image_rows"] == 1 and failure["instance_index"] is None
    [photo] = [i for i, r in enumerate(got) if r["image_key"] == "photo.jpg"]
    np.testing.assert_array_equal(pick([photo], SIZES["coco"])[0].numpy(),
                                  cpu_crop(next(r for r in expected if key(r) == ("photo.jpg", 0))))


def test_an_image_decoded_to_another_size_than_its_header_fails(images, monkeypatch):
    rows, pending = plan_crops(read_images(pa.Table.from_pylist(
        [task(images / "photo.jpg", [[5, 5, 60, 90]])], schema=IMAGE_TASK_SCHEMA), storage_options={}), **ARGS)
    pending[0].size = (98, 131)
    [error] = decode_on_device(pending, torch.device("cpu"), 10**8)
    assert str(error) == "decoded to 97x131 but its header says 98x131"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or gpu_jpeg_decoder() is None, reason="needs CUDA and torchvision")
def test_nvjpeg_crops_are_close_to_pillows(images, tmp_path):
    rng = np.random.default_rng(4)
    smooth = np.clip(rng.normal(128, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
    photo = tmp_path / "smooth.jpg"
    photo.write_bytes(jpeg(Image.fromarray(smooth).resize((640, 480), Image.BILINEAR)))
    batch = pa.Table.from_pylist([task(photo, [[100, 50, 200, 400], [400, 100, 150, 300]])], schema=IMAGE_TASK_SCHEMA)
    expected = make_crops(batch, **ARGS).to_pylist()
    table, pick = on_device(batch, "cuda")
    for i, row in enumerate(expected):
        ours = pick([i], SIZES["coco"])[0].cpu().numpy().astype(int)
        difference = np.abs(ours - cpu_crop(row).astype(int))
        # nvJPEG's IDCT and chroma upsampling round differently from libjpeg-turbo's (H200: mean 1.16 here).
        p99 = np.percentile(difference, 99)
        assert difference.mean() < 2.0 and p99 <= 10, (difference.mean(), p99, difference.max())
