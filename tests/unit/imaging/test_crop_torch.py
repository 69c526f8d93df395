"""crop_torch: images decoded for the device and crops cut there in torch equal the CPU crop, byte for byte."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.crop_torch import (
    EncodedImage,
    ImagesOnDevice,
    decode_on_device,
    gpu_jpeg_decoder,
)
from raypose.imaging.decode import decode_image, probe_image
from raypose.imaging.geometry import center_scale_from_boxes


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def encoded(data: bytes) -> EncodedImage:
    header = probe_image(data, 10**8)
    return EncodedImage(data, header.size, header.plain_jpeg)


def test_crops_cut_in_torch_equal_the_cpu_crops():
    rng = np.random.default_rng(3)
    images = [jpeg(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((131, 97, 3), (120, 160, 3))]
    decoded = decode_on_device([encoded(data) for data in images], torch.device("cpu"), 10**8, nvjpeg=False)
    boxes = [(0, [[0, 0, 97, 131], [40, 50, 20, 30]]), (1, [[10, 20, 50, 80], [-20, 100, 60, 40], [150, 110, 30, 30]])]
    on_device = ImagesOnDevice(decoded)
    for size in ((192, 256), (256, 256)):
        which, centers, scales, expected = [], [], [], []
        for image, xywh in boxes:
            c, s = center_scale_from_boxes(np.array(xywh, np.float64), size)
            pixels = np.asarray(decode_image(images[image], 10**8))
            expected += [crop_image(pixels, ci, si, size) for ci, si in zip(c, s)]
            which += [image] * len(xywh)
            centers.append(c)
            scales.append(s)
        got = on_device.crops(np.concatenate(centers), np.concatenate(scales), which, size)
        np.testing.assert_array_equal(got.numpy(), np.stack(expected))  # same points, same float32 arithmetic


def test_an_image_that_fails_to_decode_is_its_image_error():
    data = jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    truncated = encoded(data[: len(data) // 2])  # a whole header, half the pixels
    [error] = decode_on_device([truncated], torch.device("cpu"), 10**8, nvjpeg=False)
    assert error.stage == "decode" and str(error).startswith("corrupt or truncated")


def test_an_image_decoded_to_another_size_than_its_header_fails():
    image = encoded(jpeg(np.zeros((131, 97, 3), np.uint8)))
    image.size = (98, 131)
    [error] = decode_on_device([image], torch.device("cpu"), 10**8, nvjpeg=False)
    assert str(error) == "decoded to 97x131 but its header says 98x131"


def test_nvjpeg_chosen_without_torchvision_is_an_error(monkeypatch):
    monkeypatch.setattr("raypose.imaging.crop_torch.gpu_jpeg_decoder", lambda: None)
    with pytest.raises(RuntimeError, match="torchvision is not installed"):
        decode_on_device([encoded(jpeg(np.zeros((8, 8, 3), np.uint8)))], torch.device("cpu"), 10**8, nvjpeg=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or gpu_jpeg_decoder() is None, reason="needs CUDA and torchvision")
def test_nvjpeg_crops_are_close_to_pillows():
    rng = np.random.default_rng(4)
    smooth = np.clip(rng.normal(128, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
    data = jpeg(np.asarray(Image.fromarray(smooth).resize((640, 480), Image.BILINEAR)))
    [pixels] = decode_on_device([encoded(data)], torch.device("cuda"), 10**8, nvjpeg=True)
    size = (192, 256)
    centers, scales = center_scale_from_boxes(np.array([[100, 50, 200, 400], [400, 100, 150, 300]], np.float64), size)
    ours = ImagesOnDevice([pixels]).crops(centers, scales, [0, 0], size).cpu().numpy().astype(int)
    reference = np.asarray(decode_image(data, 10**8))
    expected = np.stack([crop_image(reference, c, s, size) for c, s in zip(centers, scales)]).astype(int)
    difference = np.abs(ours - expected)
    # nvJPEG's IDCT and chroma upsampling round differently from libjpeg-turbo's (H200: mean 1.16 here).
    p99 = np.percentile(difference, 99)
    assert difference.mean() < 2.0 and p99 <= 10, (difference.mean(), p99, difference.max())
