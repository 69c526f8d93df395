"""Heatmap decoding against transformers' post_process_pose_estimation and flip_back."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from helpers import gaussian_blur

from raypose.imaging.geometry import center_scale_from_boxes
from raypose.imaging.heatmaps import decode_heatmaps, flip_back, instance_scores
from raypose.imaging.keypoint_schemas import COCO17

reference = pytest.importorskip("transformers.models.vitpose.image_processing_pil_vitpose")
modeling = pytest.importorskip("transformers.models.vitpose.modeling_vitpose")
pytest.importorskip("scipy")

BOXES = [
    [[10.0, 20.0, 50.0, 80.0], [100.5, 60.2, 30.0, 20.0]],
    [[3.3, 7.7, 40.2, 10.1]],
    [[0.0, 0.0, 640.0, 480.0], [300.0, 10.0, 20.0, 300.0], [5.0, 5.0, 1.5, 2.5]],
]


def peaked_heatmaps(rng, n, k, h, w):
    """Noise plus one Gaussian peak per channel at a random (sub-pixel) place, some near the border."""
    yy, xx = np.mgrid[0:h, 0:w]
    cx = rng.uniform(-1, w, size=(n, k, 1, 1))
    cy = rng.uniform(-1, h, size=(n, k, 1, 1))
    peaks = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 2.0**2))
    return (peaks + 0.05 * rng.normal(size=(n, k, h, w))).astype(np.float32)


def reference_decode(heatmaps: np.ndarray, boxes):
    processor = reference.VitPoseImageProcessorPil()
    outputs = modeling.VitPoseEstimatorOutput(heatmaps=torch.from_numpy(heatmaps.copy()))
    results = processor.post_process_pose_estimation(outputs, boxes=[np.array(b, np.float32) for b in boxes])
    keypoints = torch.stack([r["keypoints"] for image in results for r in image]).numpy()
    scores = torch.stack([r["scores"] for image in results for r in image]).numpy()
    return keypoints, scores


@pytest.mark.parametrize("kind", ["peaked", "noise", "all-negative", "flat"])
@pytest.mark.parametrize("heatmap_size", [(64, 48), (96, 72), (16, 12)])
def test_decode_equals_reference(kind, heatmap_size):
    rng = np.random.default_rng(zlib.crc32(f"{kind}{heatmap_size}".encode()))
    flat = [box for image in BOXES for box in image]
    n, (h, w) = len(flat), heatmap_size
    if kind == "peaked":
        heatmaps = peaked_heatmaps(rng, n, 17, h, w)
    elif kind == "noise":
        heatmaps = rng.normal(size=(n, 17, h, w)).astype(np.float32)
    elif kind == "all-negative":  # the reference puts such peaks at (-1, -1); so must we
        heatmaps = -np.abs(rng.normal(size=(n, 17, h, w))).astype(np.float32) - 0.01
    else:
        heatmaps = np.full((n, 17, h, w), 0.5, np.float32)
    ref_keypoints, ref_scores = reference_decode(heatmaps, BOXES)
    centers, scales = center_scale_from_boxes(np.array(flat), (192, 256))
    keypoints, scores = decode_heatmaps(torch.from_numpy(heatmaps), torch.from_numpy(centers), torch.from_numpy(scales))
    keypoints = keypoints.numpy()
    if kind == "noise":
        # Pure noise makes DARK's Hessian near-singular: numpy's and torch's float32 log differ
        # by one ulp on ~5% of values, and a near-singular Newton step amplifies that (the
        # reference itself throws ~20% of these keypoints far off the crop). Compare the
        # keypoints the reference keeps inside the crop, to a few thousandths of a pixel.
        low = (centers - scales * 100)[:, None, :]
        high = (centers + scales * 100)[:, None, :]
        inside = ((ref_keypoints >= low) & (ref_keypoints <= high)).all(-1)
        assert inside.mean() > 0.5
        np.testing.assert_allclose(keypoints[inside], ref_keypoints[inside], rtol=0, atol=5e-3)
    else:
        np.testing.assert_allclose(keypoints, ref_keypoints, rtol=0, atol=1e-3)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=0, atol=1e-5)


def test_decode_is_batched_and_order_preserving():
    rng = np.random.default_rng(3)
    heatmaps = torch.from_numpy(peaked_heatmaps(rng, 5, 17, 64, 48))
    centers = torch.tensor(rng.uniform(50, 500, (5, 2)), dtype=torch.float32)
    scales = torch.tensor(rng.uniform(0.5, 3, (5, 2)), dtype=torch.float32)
    together, _ = decode_heatmaps(heatmaps, centers, scales)
    for i in range(5):
        alone, _ = decode_heatmaps(heatmaps[i : i + 1], centers[i : i + 1], scales[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-4)


def test_gaussian_blur_matches_scipy_reflect():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 3, 20, 15)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), kernel=11, sigma=0.8).numpy()
    ref = np.array([[gaussian_filter(m, sigma=0.8, radius=(5, 5), axes=(0, 1)) for m in ms] for ms in maps])
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_flip_back_equals_transformers():
    rng = np.random.default_rng(1)
    heatmaps = torch.from_numpy(rng.normal(size=(3, 17, 16, 12)).astype(np.float32))
    pairs = torch.tensor(COCO17.flip_pairs)
    torch.testing.assert_close(flip_back(heatmaps, pairs), modeling.flip_back(heatmaps, pairs))


def test_instance_scores_rescore_confident_keypoints_by_the_box():
    scores = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.0], [0.3, 0.3, 0.9]], np.float32)
    got = instance_scores(scores, np.array([np.nan, 0.5, 0.5]))
    # Keypoints above 0.2 count; none -> 0; a box without a score (ground truth) counts as 1.
    np.testing.assert_allclose(got, [0.7, 0.0, 0.25], rtol=1e-6)
    assert got.dtype == np.float32


