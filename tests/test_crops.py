"""Crops against the reference: transformers' VitPoseImageProcessor (PIL backend, scipy warp)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raypose.crops import center_scale_from_boxes, crop_image

reference = pytest.importorskip("transformers.models.vitpose.image_processing_pil_vitpose")
pytest.importorskip("scipy")

# Boxes inside, across the border, tiny, wide, tall, fractional, the whole image.
BOXES = [
    [10, 20, 50, 80],
    [-10, -5, 200, 150],
    [100, 60, 30, 20],
    [3.3, 7.7, 40.2, 10.1],
    [0, 0, 160, 120],
    [150, 110, 30, 40],
    [40.5, 0.25, 8.0, 119.0],
]


def reference_crop(image: np.ndarray, box, size=(192, 256)) -> np.ndarray:
    processor = reference.VitPoseImageProcessorPil(size={"width": size[0], "height": size[1]})
    out = processor.preprocess(
        Image.fromarray(image), boxes=[[box]], do_rescale=False, do_normalize=False, return_tensors="np"
    )
    return out["pixel_values"][0].transpose(1, 2, 0)


@pytest.mark.parametrize("box", BOXES)
def test_center_scale_equal_reference(box):
    center, scale = center_scale_from_boxes(np.array([box]), (192, 256))
    ref_center, ref_scale = reference.box_to_center_and_scale(np.array(box, np.float32), 192, 256)
    np.testing.assert_allclose(center[0], ref_center, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scale[0], ref_scale, rtol=1e-6)


@pytest.mark.parametrize("image_shape", [(120, 160, 3), (161, 97, 3), (48, 300, 3)])
@pytest.mark.parametrize("input_size", [(192, 256), (48, 64), (288, 384)])
def test_crop_within_bilinear_tolerance_of_reference(image_shape, input_size):
    rng = np.random.default_rng(sum(image_shape) + sum(input_size))
    image = rng.integers(0, 256, image_shape, dtype=np.uint8)
    for box in BOXES:
        center, scale = center_scale_from_boxes(np.array([box]), input_size)
        ours = crop_image(image, center[0], scale[0], input_size)
        ref = reference_crop(image, box, input_size)
        assert ours.shape == ref.shape == (input_size[1], input_size[0], 3)
        diff = np.abs(ours.astype(int) - ref.astype(int))
        # Bilinear tolerance: one grey level where a rounding tie falls the other way.
        assert diff.max() <= 1, box
        assert (diff > 0).mean() < 1e-3, box


def test_crop_of_box_outside_image_is_black_where_reference_is():
    image = np.full((50, 50, 3), 200, np.uint8)
    box = [30, 30, 60, 60]
    center, scale = center_scale_from_boxes(np.array([box]), (192, 256))
    ours = crop_image(image, center[0], scale[0], (192, 256))
    ref = reference_crop(image, box)
    np.testing.assert_array_equal(ours == 0, ref == 0)
    assert (ours == 200).any() and (ours == 0).any()
