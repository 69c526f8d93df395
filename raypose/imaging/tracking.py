"""Track ids across a video's frames: each instance linked to the track whose last instance it overlaps most.

Pure numpy, deterministic (the same rows give the same ids, so a shard redone on resume gets the
ones it had). Frame by frame, in order: the similarity of an instance to a live track is the mean
of their boxes' IoU and their keypoints' OKS (COCO's object keypoint similarity, the keypoints
weighted by both scores); pairs are taken greedily, most similar first (ByteTrack takes high-
scored instances first: here the instance score weighs in the order), those below `min_similarity`
are not linked; an instance left over starts a track; a track not seen for `max_gap` frames ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_SIGMA = 0.05  # OKS sigma for keypoints whose schema defines none (about COCO's median)


@dataclass(frozen=True)
class FrameInstances:
    """One frame's instances: boxes (N, 4) xywh, keypoints (N, K, 2), their scores (N, K), instance scores (N)."""

    boxes: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray
    instance_scores: np.ndarray


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xywh box in `a` (N, 4) with every one in `b` (M, 4): (N, M)."""
    a0, a1 = a[:, None, :2], a[:, None, :2] + a[:, None, 2:]
    b0, b1 = b[None, :, :2], b[None, :, :2] + b[None, :, 2:]
    overlap = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None).prod(-1)
    union = a[:, None, 2:].prod(-1) + b[None, :, 2:].prod(-1) - overlap
    return np.where(union > 0, overlap / np.maximum(union, 1e-12), 0.0)


def keypoint_similarity(a: FrameInstances, b: FrameInstances, sigmas: np.ndarray) -> np.ndarray:
    """OKS of every instance of `a` with every one of `b` (N, M), over keypoints weighted by both scores."""
    d2 = ((a.keypoints[:, None] - b.keypoints[None]) ** 2).sum(-1)  # (N, M, K)
    area = np.maximum(a.boxes[:, None, 2] * a.boxes[:, None, 3], 1.0)[..., None]  # (N, 1, 1)
    similar = np.exp(-d2 / (2 * area * (2 * sigmas) ** 2))
    weight = np.sqrt(np.clip(a.scores[:, None], 0, 1) * np.clip(b.scores[None], 0, 1))
    total = weight.sum(-1)
    return np.where(total > 0, (similar * weight).sum(-1) / np.maximum(total, 1e-12), 0.0)


def link_tracks(frames: list[FrameInstances], sigmas: np.ndarray | None = None, min_similarity: float = 0.3,
                max_gap: int = 5) -> list[np.ndarray]:
    """Each frame's instances' track ids (0, 1, ... in order of appearance), the frames in video order."""
    tracks: list[tuple[int, int, FrameInstances, int]] = []  # (track id, last frame, its frame, its row there)
    next_id = 0
    out = []
    for t, frame in enumerate(frames):
        n = len(frame.boxes)
        ids = np.full(n, -1, np.int64)
        tracks = [track for track in tracks if t - track[1] <= max_gap]
        if n and tracks:
            k = frame.keypoints.shape[1]
            sig = sigmas if sigmas is not None and len(sigmas) == k else np.full(k, DEFAULT_SIGMA)
            similarity = np.stack([_similarity(frame, last, row, sig) for _, _, last, row in tracks], axis=1)
            # Most similar pairs first; among equals, the better-scored instance, then the older track.
            order = np.lexsort((np.arange(similarity.size) % len(tracks), -np.repeat(frame.instance_scores, len(tracks)),
                                -similarity.reshape(-1)))
            taken = set()
            for flat in order:
                i, j = divmod(int(flat), len(tracks))
                if similarity[i, j] < min_similarity:
                    break
                if ids[i] >= 0 or j in taken:
                    continue
                ids[i] = tracks[j][0]
                taken.add(j)
                tracks[j] = (tracks[j][0], t, frame, i)
        for i in np.flatnonzero(ids < 0):
            ids[i] = next_id
            tracks.append((next_id, t, frame, int(i)))
            next_id += 1
        out.append(ids)
    return out


def _similarity(frame: FrameInstances, last: FrameInstances, row: int, sigmas: np.ndarray) -> np.ndarray:
    """Every instance of `frame` against one track's last instance (row `row` of `last`): mean of IoU and OKS."""
    one = FrameInstances(last.boxes[row:row + 1], last.keypoints[row:row + 1], last.scores[row:row + 1],
                         last.instance_scores[row:row + 1])
    return 0.5 * box_iou(frame.boxes, one.boxes)[:, 0] + 0.5 * keypoint_similarity(frame, one, sigmas)[:, 0]
