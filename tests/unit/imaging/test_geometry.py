"""Crop geometry against the reference: center/scale of boxes, and the JPEG draft reduction a crop affords."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import REFERENCE_BOXES

from raypose.imaging.geometry import center_scale_from_boxes, crops_source_region

reference = pytest.importorskip("transformers.models.vitpose.image_processing_pil_vitpose")
pytest.importorskip("scipy")



@pytest.mark.parametrize("box", REFERENCE_BOXES)
def test_center_scale_equal_reference(box):
    center, scale = center_scale_from_boxes(np.array([box]), (192, 256))
    ref_center, ref_scale = reference.box_to_center_and_scale(np.array(box, np.float32), 192, 256)
    np.testing.assert_allclose(center[0], ref_center, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scale[0], ref_scale, rtol=1e-6)


# --- fast paths: crops cut from the PIL image, and JPEG draft (reduced) decoding -----------------


def test_jpeg_reduction_is_the_largest_that_every_crop_affords():
    from raypose.imaging.geometry import jpeg_reduction

    def reduction(*heights):
        boxes = np.array([[0, 0, h * 0.75, h] for h in heights])
        _, scales = center_scale_from_boxes(boxes, (192, 256))
        return jpeg_reduction(scales, [(192, 256)] * len(heights))

    # pitch = 1.25 h / 255 image pixels per crop pixel
    assert reduction(3000) == 8 and reduction(900) == 4 and reduction(450) == 2
    assert reduction(400) == 1 and reduction(100) == 1
    assert reduction(3000, 450) == 2  # the smallest crop decides
    assert jpeg_reduction(np.zeros((0, 2)), []) == 1




def test_crops_cut_from_their_source_region_equal_crops_cut_from_the_image():
    from raypose.imaging.crop_cpu import crop_image

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    boxes = np.array([[120, 80, 40, 90], [300, 10, 60, 60], [-30, 200, 80, 120], [395, 295, 30, 30]], np.float64)
    for count in (1, 2, 4):
        centers, scales = center_scale_from_boxes(boxes[:count], (192, 256))
        crops = [(c, s, (192, 256)) for c, s in zip(centers, scales)]
        x0, y0, x1, y1 = crops_source_region(crops, (400, 300))
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
        if count == 1:
            assert (x1 - x0) * (y1 - y0) < 400 * 300 / 4
        region = image[y0:y1, x0:x1]
        for center, scale, size in crops:
            np.testing.assert_array_equal(
                crop_image(region, center, scale, size, full_size=(400, 300), origin=(x0, y0)),
                crop_image(image, center, scale, size))
