"""The CPU crop against the reference: transformers' VitPoseImageProcessor (PIL backend, scipy warp)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import REFERENCE_BOXES
from PIL import Image

from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.geometry import center_scale_from_boxes

reference = pytest.importorskip("transformers.models.vitpose.image_processing_pil_vitpose")
pytest.importorskip("scipy")



def reference_crop(image: np.ndarray, box, size=(192, 256)) -> np.ndarray:
    processor = reference.VitPoseImageProcessorPil(size={"width": size[0], "height": size[1]})
    out = processor.preprocess(
        Image.fromarray(image), boxes=[[box]], do_rescale=False, do_normalize=False, return_tensors="np"
    )
    return out["pixel_values"][0].transpose(1, 2, 0)


@pytest.mark.parametrize("image_shape", [(120, 160, 3), (161, 97, 3), (48, 300, 3)])
@pytest.mark.parametrize("input_size", [(192, 256), (48, 64), (288, 384)])
def test_crop_within_bilinear_tolerance_of_reference(image_shape, input_size):
    rng = np.random.default_rng(sum(image_shape) + sum(input_size))
    image = rng.integers(0, 256, image_shape, dtype=np.uint8)
    for box in REFERENCE_BOXES:
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


# --- fast paths: crops cut from the PIL image, and JPEG draft (reduced) decoding -----------------


@pytest.mark.parametrize("image_shape", [(120, 160, 3), (161, 97, 3)])
def test_crop_from_pil_image_equals_crop_from_array(image_shape):
    from raypose.imaging.crop_cpu import crop_image

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, image_shape, dtype=np.uint8)
    for box in REFERENCE_BOXES:
        center, scale = center_scale_from_boxes(np.array([box]), (192, 256))
        np.testing.assert_array_equal(
            crop_image(Image.fromarray(image), center[0], scale[0], (192, 256)),
            crop_image(image, center[0], scale[0], (192, 256)),
        )


def test_jpeg_draft_crop_keeps_the_geometry():
    import io

    from raypose.imaging.crop_cpu import crop_image
    from raypose.imaging.decode import decode_image_reduced
    from raypose.imaging.geometry import clip_boxes, crop_sampling_grid, jpeg_reduction

    # A smooth picture: block means and point samples agree closely, so any misplacement shows.
    yy, xx = np.mgrid[0:1200, 0:1600]
    image = (10 + np.stack([xx * 245 // 1599, yy * 245 // 1199, (xx + yy) * 245 // 2798], -1)).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(image).save(data, format="JPEG", quality=95)
    boxes = [[100, 50, 700, 1000], [-200, 300, 900, 1200]]  # the second is clipped to the image
    clipped, _ = clip_boxes(np.array(boxes, np.float64), 1600, 1200)
    centers, scales = center_scale_from_boxes(clipped, (192, 256))
    reduction = jpeg_reduction(scales, [(192, 256)] * 2)
    decoded, factor, size = decode_image_reduced(data.getvalue(), 10**9, reduction)
    assert factor == reduction == 4 and size == (1600, 1200) and decoded.size == (400, 300)
    full = np.asarray(Image.open(data).convert("RGB"))

    for center, scale in zip(centers, scales):
        ours = crop_image(decoded, center, scale, (192, 256), reduction=factor, full_size=size).astype(int)
        ref = crop_image(full, center, scale, (192, 256)).astype(int)
        np.testing.assert_array_equal(ours == 0, ref == 0)  # the same zero border (the picture has no 0)
        xs, ys = crop_sampling_grid(center, scale, (192, 256))
        inside = ((xs >= 0) & (xs <= 1599))[None, :] & ((ys >= 0) & (ys <= 1199))[:, None]
        assert inside.any() and not inside.all()
        assert np.abs(ours - ref)[inside].mean() < 1.5


