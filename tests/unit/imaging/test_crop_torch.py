"""crop_torch: crops cut on the device in torch equal the CPU crop, byte for byte."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.crop_torch import ImagesOnDevice
from raypose.imaging.decode import decode_image
from raypose.imaging.decode_device import DecodedImage
from raypose.imaging.geometry import center_scale_from_boxes


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_crops_cut_in_torch_equal_the_cpu_crops():
    rng = np.random.default_rng(3)
    images = [jpeg(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((131, 97, 3), (120, 160, 3))]
    decoded = [DecodedImage(torch.from_numpy(np.array(decode_image(data, 10**8))).permute(2, 0, 1),
                            Image.open(io.BytesIO(data)).size) for data in images]
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
