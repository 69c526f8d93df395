"""How far the plain and the mirrored crop's predictions disagree, per keypoint and per instance.

The flip test runs each crop and its mirror image; a model that has learnt the pose predicts
the same keypoints from both (after `flip_back`), and one that guesses (left and right mixed
up, a limb it cannot see, a second person in the box) often does not. These functions turn the
two predictions, decoded apart, into numbers a reviewer sorts by:

- `keypoint_flip_errors`: per keypoint, the distance between the two predictions in pixels of
  the model's input crop (the box resampled to the model's input size, e.g. 192x256): the image
  distance with x scaled by (W - 1) / box width and y by (H - 1) / box height, box = the crop's
  scale x 200 (the instance's box grown to the input's aspect ratio and padded 1.25x; UDP maps its
  ends to the crop's first and last pixel). The same number means the same error on a small and
  on a large person; divide by W - 1 for a fraction of the crop box's width.
- `flip_agreements`: per keypoint, COCO's OKS term between the two predictions,
  exp(-d^2 / (2 area (2 sigma)^2)), with the schema's sigmas and the instance's box area (w x h)
  as the object's area (a prediction has no segment); schemas without sigmas use
  `UNIFORM_SIGMA` for every keypoint. `flip_oks` is their mean: COCO's OKS between the two.
- `instance_doubts`: 1 - box score x the mean over keypoints of (keypoint score x agreement), in
  [0, 1], highest first: a keypoint counts as trusted as far as its heatmap peak is high and its
  mirror image puts it in the same place. Chosen over 1 - instance_score x flip_oks because it
  ranked the wrong labels better on held-out drawn people (benchmarks/flip_doubt.py).
"""

from __future__ import annotations

import numpy as np

from raypose.imaging.geometry import PIXEL_STD
from raypose.imaging.keypoint_schemas import COCO17

# The mean of COCO's 17 sigmas: a keypoint of average difficulty, for schemas that publish none.
UNIFORM_SIGMA = float(np.mean(COCO17.sigmas))


def keypoint_flip_errors(
    plain: np.ndarray, mirrored: np.ndarray, scales: np.ndarray, input_size: tuple[int, int]
) -> np.ndarray:
    """Keypoints (N, K, 2) of the plain and the mirrored crop in image pixels, crop scales (N, 2) and the model's
    input (width, height) -> the distance between the two (N, K), in input-crop pixels."""
    pixels_per_box = (np.asarray(input_size, np.float64) - 1) / (np.asarray(scales, np.float64) * PIXEL_STD)
    difference = (np.asarray(plain, np.float64) - np.asarray(mirrored, np.float64)) * pixels_per_box[:, None, :]
    return np.sqrt((difference**2).sum(-1)).astype(np.float32)


def flip_agreements(
    plain: np.ndarray, mirrored: np.ndarray, areas: np.ndarray, sigmas: tuple[float, ...] | None
) -> np.ndarray:
    """Per keypoint (N, K), COCO's OKS term between two predictions (N, K, 2) in image pixels, with box areas (N,)
    as the object areas: exp(-d^2 / (2 area (2 sigma)^2)), as pycocotools' `computeOks`."""
    k = plain.shape[1]
    sigma = np.asarray(sigmas if sigmas is not None else [UNIFORM_SIGMA] * k, np.float64)
    squared = ((np.asarray(plain, np.float64) - np.asarray(mirrored, np.float64)) ** 2).sum(-1)
    area = np.asarray(areas, np.float64)[:, None] + np.spacing(1)  # pycocotools' eps for a zero area
    return np.exp(-squared / (2 * area * (2 * sigma) ** 2)).astype(np.float32)


def flip_oks(
    plain: np.ndarray, mirrored: np.ndarray, areas: np.ndarray, sigmas: tuple[float, ...] | None
) -> np.ndarray:
    """COCO OKS (N,) between two predictions (N, K, 2), every keypoint counted: the mean of `flip_agreements`."""
    return flip_agreements(plain, mirrored, areas, sigmas).mean(axis=1)


def instance_doubts(keypoint_scores: np.ndarray, agreements: np.ndarray, box_scores: np.ndarray) -> np.ndarray:
    """One number per instance to review by, highest first: 1 - box score x mean_k(keypoint score_k x agreement_k).

    Keypoint scores (N, K) are the heatmap peaks (clipped to [0, 1]), agreements (N, K) from
    `flip_agreements`, box scores (N,) NaN for a box without one (ground truth: 1).
    """
    trust = (np.clip(keypoint_scores, 0.0, 1.0) * np.clip(agreements, 0.0, 1.0)).mean(axis=1)
    return (1.0 - np.where(np.isnan(box_scores), 1.0, box_scores) * trust).astype(np.float32)
