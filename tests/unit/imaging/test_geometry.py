"""Crop geometry against the reference: center/scale of boxes, and the JPEG draft reduction a crop affords."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REFERENCE_BOXES

from raypose.imaging.geometry import center_scale_from_boxes

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


