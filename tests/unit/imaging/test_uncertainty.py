"""Flip disagreement on predictions whose distance is known: errors in input-crop pixels, OKS as pycocotools, doubt."""

from __future__ import annotations

import numpy as np
import pytest

from raypose.imaging.geometry import center_scale_from_boxes
from raypose.imaging.keypoint_schemas import COCO17
from raypose.imaging.uncertainty import (
    UNIFORM_SIGMA,
    flip_agreements,
    flip_oks,
    instance_doubts,
    keypoint_flip_errors,
)

INPUT = (192, 256)  # ViTPose's (width, height)


def predictions(k: int = 17, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 300, (n, k, 2))


def test_agreeing_predictions_have_no_error_and_an_oks_of_one():
    plain = predictions()
    _, scales = center_scale_from_boxes(np.array([[0, 0, 60.0, 150.0], [10, 10, 300.0, 200.0]]), INPUT)
    np.testing.assert_array_equal(keypoint_flip_errors(plain, plain.copy(), scales, INPUT), 0)
    np.testing.assert_allclose(flip_oks(plain, plain.copy(), np.array([9000.0, 60000.0]), COCO17.sigmas), 1.0)


def test_the_error_is_in_pixels_of_the_input_crop_whatever_the_box_size():
    """A keypoint 3% of the box's width off reads the same on a small and on a large person."""
    boxes = np.array([[0, 0, 48.0, 64.0], [0, 0, 480.0, 640.0]])  # already 3:4, so the crop box is 1.25 x the box
    _, scales = center_scale_from_boxes(boxes, INPUT)
    plain = np.zeros((2, 17, 2))
    mirrored = plain.copy()
    mirrored[:, 5, 0] = 0.03 * boxes[:, 2] * 1.25  # x only
    mirrored[:, 9, 1] = 0.1 * boxes[:, 3] * 1.25  # y only
    errors = keypoint_flip_errors(plain, mirrored, scales, INPUT)
    np.testing.assert_allclose(errors[:, 5], 0.03 * 191, rtol=1e-5)
    np.testing.assert_allclose(errors[:, 9], 0.1 * 255, rtol=1e-5)
    assert errors.dtype == np.float32 and (np.delete(errors, [5, 9], axis=1) == 0).all()


def test_flip_oks_is_pycocotools_oks_with_the_box_area():
    plain = predictions(n=3, seed=1)
    mirrored = plain + np.random.default_rng(2).normal(0, 6, plain.shape)
    areas = np.array([5000.0, 20000.0, 800.0])
    expected = []
    for p, m, area in zip(plain, mirrored, areas):  # pycocotools cocoeval.computeOks, every keypoint visible
        variances = (np.array(COCO17.sigmas) * 2) ** 2
        e = ((p - m) ** 2).sum(-1) / variances / (area + np.spacing(1)) / 2
        expected.append(np.exp(-e).mean())
    np.testing.assert_allclose(flip_oks(plain, mirrored, areas, COCO17.sigmas), expected, rtol=1e-6)


def test_a_schema_without_sigmas_uses_the_mean_coco_sigma_for_every_keypoint():
    assert UNIFORM_SIGMA == pytest.approx(np.mean(COCO17.sigmas))
    plain = predictions(k=16)
    mirrored = plain + 5.0
    uniform = flip_oks(plain, mirrored, np.array([4000.0, 4000.0]), (UNIFORM_SIGMA,) * 16)
    np.testing.assert_array_equal(flip_oks(plain, mirrored, np.array([4000.0, 4000.0]), None), uniform)
    assert 0 < uniform[0] < 1


def test_the_doubt_trusts_a_keypoint_as_far_as_its_peak_and_its_mirror_image_agree():
    scores = np.array([[0.9, 0.9], [0.6, 0.6], [0.9, 0.9], [0.9, 0.9]])
    agreements = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # the third: confident, one point disputed
    box_scores = np.array([np.nan, np.nan, np.nan, 0.5])  # ground-truth boxes count as 1
    doubt = instance_doubts(scores, agreements, box_scores)
    np.testing.assert_allclose(doubt, [0.1, 0.4, 0.55, 0.55], rtol=1e-6)
    assert list(np.argsort(-doubt, kind="stable")) == [2, 3, 1, 0]
    plain = predictions(n=1)
    mirrored = plain.copy()
    mirrored[0, 3] += 8.0
    agreement = flip_agreements(plain, mirrored, np.array([3000.0]), COCO17.sigmas)
    assert agreement[0, 3] < 1 and (np.delete(agreement, 3, axis=1) == 1).all()
    np.testing.assert_allclose(flip_oks(plain, mirrored, np.array([3000.0]), COCO17.sigmas), agreement.mean(1))
