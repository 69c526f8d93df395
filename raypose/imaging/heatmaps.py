"""Heatmaps -> keypoints, batched in torch on the heatmaps' own device.

A port of transformers' `VitPoseImageProcessor.post_process_pose_estimation`: argmax,
DARK refinement (Gaussian-smoothed log-heatmap, one Newton step), then the UDP inverse
transform back to image pixels. It reproduces the reference's edge cases, including
the `-1` location of a keypoint whose heatmap has no positive value.

`decode="original"` smooths as the original ViTPose does instead (mmpose 0.x `post_dark_udp`,
used by its UDP configs: `cv2.GaussianBlur(heatmap, (k, k), 0)`, i.e. sigma 0.3 * ((k - 1) / 2 - 1)
+ 0.8 = 2.0 for k=11, border reflect-101); every other step is the same in both.
"""

from __future__ import annotations

import numpy as np
import torch

from raypose.imaging.geometry import PIXEL_STD

KEYPOINT_SCORE_FLOOR = 0.2  # mmpose's rescoring: keypoints above this count toward the instance score
DARK_KERNEL = 11
DARK_SIGMA = 0.8  # transformers' value; the original ViTPose (cv2.GaussianBlur(k, k, 0)) uses 2.0 for k=11
DECODES = ("transformers", "original")


def opencv_sigma(kernel: int) -> float:
    """The sigma cv2.getGaussianKernel derives from a kernel size when given sigma 0 (kernels > 7)."""
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8


def decode_heatmaps(
    heatmaps: torch.Tensor,
    centers: torch.Tensor,
    scales: torch.Tensor,
    kernel: int = DARK_KERNEL,
    sigma: float | None = None,
    decode: str = "transformers",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps (N, K, h, w) and crop centers/scales (N, 2) -> keypoints (N, K, 2) in image pixels and scores (N, K).

    `decode`: "transformers" (sigma 0.8, scipy's reflect border) or "original" (cv2's sigma for
    `kernel`, reflect-101 border); `sigma` overrides the variant's.
    """
    if decode not in DECODES:
        raise ValueError(f"decode: expected one of {DECODES}, got {decode!r}")
    original = decode == "original"
    if sigma is None:
        sigma = opencv_sigma(kernel) if original else DARK_SIGMA
    heatmaps = heatmaps.float()
    centers = centers.to(heatmaps.device, torch.float32)
    scales = scales.to(heatmaps.device, torch.float32)
    coords, scores = heatmap_argmax(heatmaps)
    coords = dark_refine(coords, heatmaps, kernel, sigma, border="reflect_101" if original else "reflect")
    return heatmap_to_image(coords, centers, scales, heatmaps.shape[-2:]), scores


def heatmap_argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer peak location (N, K, 2) as (x, y) and peak value (N, K); (-1, -1) where the peak is <= 0."""
    n, k, _, width = heatmaps.shape
    scores, index = heatmaps.reshape(n, k, -1).max(dim=2)
    coords = torch.stack([index % width, index // width], dim=-1).float()
    coords = torch.where((scores > 0).unsqueeze(-1), coords, torch.full_like(coords, -1.0))
    return coords, scores


def blurred_at(
    heatmaps: torch.Tensor, planes: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
    kernel: int, sigma: float, border: str = "reflect",
) -> torch.Tensor:
    """The Gaussian-smoothed heatmaps at some points: plane (index into N*K), row and column, broadcast.

    scipy's `reflect` (half-sample symmetric) border, or `reflect_101` (OpenCV's
    BORDER_DEFAULT, scipy's `mirror`: the edge pixel is not repeated). As scipy's
    `gaussian_filter`: one axis at a time (rows first), each pass accumulated in float64 and
    stored in the input's dtype. DARK needs 9 smoothed values per keypoint, so only the
    kernel-sized window around each is read, not the whole plane.
    """
    if border not in ("reflect", "reflect_101"):
        raise ValueError(f"border: expected reflect or reflect_101, got {border!r}")
    pad = _symmetric_index if border == "reflect" else _reflect_101_index
    n, k, height, width = heatmaps.shape
    device = heatmaps.device
    radius = (kernel - 1) // 2
    taps = torch.arange(-radius, radius + 1, device=device)
    weights = torch.exp(-0.5 * taps.double() ** 2 / sigma**2)
    weights = weights / weights.sum()
    planes, ys, xs = torch.broadcast_tensors(planes, ys, xs)
    # pad(size, radius)[c + radius + t] is the in-map index that tap t of coordinate c reads.
    rows = pad(height, radius, device)[ys.unsqueeze(-1) + radius + taps]  # (..., T)
    cols = pad(width, radius, device)[xs.unsqueeze(-1) + radius + taps]
    window = heatmaps.reshape(n * k, height, width)[
        planes[..., None, None], rows.unsqueeze(-1), cols.unsqueeze(-2)
    ]  # (..., T rows, T cols)
    down = (window.double() * weights.view(-1, 1)).sum(-2).to(heatmaps.dtype)
    return (down.double() * weights).sum(-1).to(heatmaps.dtype)


def dark_refine(
    coords: torch.Tensor, heatmaps: torch.Tensor, kernel: int, sigma: float, border: str = "reflect"
) -> torch.Tensor:
    """One Newton step on the smoothed log-heatmap around each integer peak (DARK, Zhang et al. 2020)."""
    n, k, height, width = heatmaps.shape
    # The reference smooths whole maps, takes log(clip(., 0.001, 50)), pads by one (edge
    # mode) and reads the 3x3 neighbourhood through flat indices, so a peak at (-1, -1) wraps
    # into the previous map. Same reads here, each smoothed value computed where it is read.
    row = width + 2
    plane = row * (height + 2)
    total = plane * n * k
    index = (coords[..., 0] + 1 + (coords[..., 1] + 1) * row).long()
    index = index + plane * torch.arange(n * k, device=coords.device).reshape(n, k)

    def at(offset: int) -> torch.Tensor:
        flat = (index + offset) % total
        padded_y, padded_x = (flat % plane) // row, flat % row
        ys = (padded_y - 1).clamp(0, height - 1)
        xs = (padded_x - 1).clamp(0, width - 1)
        return blurred_at(heatmaps, flat // plane, ys, xs, kernel, sigma, border).clamp(0.001, 50).log()

    center, right, left = at(0), at(1), at(-1)
    down, up = at(row), at(-row)
    dx = 0.5 * (right - left)
    dy = 0.5 * (down - up)
    dxx = right - 2 * center + left
    dyy = down - 2 * center + up
    dxy = 0.5 * (at(row + 1) - right - down + center + center - left - up + at(-row - 1))
    # The reference adds eps * np.eye(2), a float64 array, so its Newton step is solved in float64.
    eps = float(torch.finfo(torch.float32).eps)
    dxx, dxy, dyy, dx, dy = (t.double() for t in (dxx, dxy, dyy, dx, dy))
    step_x, step_y = _solve_2x2(dxx + eps, dxy, dxy, dyy + eps, dx, dy)
    return (coords.double() - torch.stack([step_x, step_y], dim=-1)).float()


def heatmap_to_image(
    coords: torch.Tensor, centers: torch.Tensor, scales: torch.Tensor, heatmap_size: tuple[int, int]
) -> torch.Tensor:
    """UDP inverse transform: heatmap (x, y) -> image pixels, for crops given by center/scale."""
    height, width = heatmap_size
    box = scales * PIXEL_STD
    # Divided by Python numbers: a tensor made here would be a host->device copy that waits for the GPU.
    unit = torch.stack([box[..., 0] / (width - 1.0), box[..., 1] / (height - 1.0)], dim=-1)
    return coords * unit.unsqueeze(1) + (centers - 0.5 * box).unsqueeze(1)


def flip_back(heatmaps: torch.Tensor, flip_pairs: torch.Tensor) -> torch.Tensor:
    """Heatmaps of a mirrored crop -> heatmaps of the crop: swap left/right channels, mirror horizontally."""
    order = torch.arange(heatmaps.shape[1], device=heatmaps.device)
    if flip_pairs.numel():
        left, right = flip_pairs.to(heatmaps.device).unbind(-1)
        order[left], order[right] = right, left
    return heatmaps.index_select(1, order).flip(-1)


def _solve_2x2(a, b, c, d, u, v):
    """inverse([[a, b], [c, d]]) @ [u, v], element-wise, in LAPACK's order of operations.

    The reference inverts with numpy (LU with partial pivoting); doing the same arithmetic
    keeps ill-conditioned Newton steps (flat or noisy heatmaps) equal to it too.
    """
    swap = c.abs() > a.abs()
    p, q, r, s = torch.where(swap, c, a), torch.where(swap, d, b), torch.where(swap, a, c), torch.where(swap, b, d)
    factor = r * (1.0 / p)  # dgetrf2 scales the column by the pivot's reciprocal
    pivot = s - factor * q
    # Columns of the inverse: solve for e1 and e2 (rows permuted when swapped).
    e1_top, e1_bottom = torch.where(swap, 0.0, 1.0), torch.where(swap, 1.0, 0.0)
    e2_top, e2_bottom = 1.0 - e1_top, 1.0 - e1_bottom
    x2 = (e1_bottom - factor * e1_top) / pivot
    x1 = (e1_top - q * x2) / p
    y2 = (e2_bottom - factor * e2_top) / pivot
    y1 = (e2_top - q * y2) / p
    return x1 * u + y1 * v, x2 * u + y2 * v


def _symmetric_index(size: int, radius: int, device) -> torch.Tensor:
    index = torch.arange(-radius, size + radius, device=device)
    index = torch.where(index < 0, -index - 1, index)
    index = torch.where(index >= size, 2 * size - index - 1, index)
    # Kernels wider than the map reflect more than once.
    return index.clamp(0, size - 1)


def _reflect_101_index(size: int, radius: int, device) -> torch.Tensor:
    index = torch.arange(-radius, size + radius, device=device)
    if size == 1:
        return torch.zeros_like(index)  # OpenCV: a one-pixel row reflects onto itself
    index = torch.where(index < 0, -index, index)
    index = torch.where(index >= size, 2 * size - index - 2, index)
    # Kernels wider than the map reflect more than once.
    return index.clamp(0, size - 1)


def instance_scores(scores: np.ndarray, box_scores: np.ndarray) -> np.ndarray:
    """mmpose's top-down rescoring of instances (N, K) -> (N,): mean of keypoint scores above 0.2
    (0 if none), times the box score (1 for a box without one, e.g. ground truth)."""
    confident = scores > KEYPOINT_SCORE_FLOOR
    means = np.where(confident, scores, 0).sum(axis=1) / np.maximum(confident.sum(axis=1), 1)
    return (means * np.where(np.isnan(box_scores), 1.0, box_scores)).astype(np.float32)
