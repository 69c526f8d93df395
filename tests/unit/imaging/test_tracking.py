"""Track ids: instances linked frame to frame by IoU and OKS, deterministically."""

from __future__ import annotations

import numpy as np

from raypose.imaging.tracking import FrameInstances, box_iou, link_tracks


def frame(boxes: list[list[float]], scores: list[float] | None = None) -> FrameInstances:
    """Instances whose 17 keypoints lie on a grid inside each box."""
    boxes = np.array(boxes, np.float64).reshape(-1, 4)
    grid = np.stack(np.meshgrid(np.linspace(0.2, 0.8, 17), np.linspace(0.1, 0.9, 17))[::-1], -1)[0]
    keypoints = boxes[:, None, :2] + grid[None] * boxes[:, None, 2:]
    n = len(boxes)
    return FrameInstances(boxes, keypoints, np.ones((n, 17)), np.array(scores or [0.9] * n))


def test_box_iou():
    iou = box_iou(np.array([[0, 0, 10, 10.0]]), np.array([[0, 0, 10, 10.0], [5, 0, 10, 10], [20, 20, 5, 5]]))
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_two_walkers_keep_their_ids_a_newcomer_gets_one_and_a_lost_track_ends():
    a, b = [0, 0, 20, 40], [100, 0, 20, 40]
    frames = [frame([a, b]),
              frame([[104, 2, 20, 40], [3, 1, 20, 40]]),  # listed the other way round, both moved a little
              frame([[7, 2, 20, 40], [50, 50, 20, 40], [108, 4, 20, 40]]),  # a newcomer in the middle
              frame([[10, 3, 20, 40]]),  # only the first walker
              frame([]),
              frame([[200, 200, 20, 40]])]
    ids = link_tracks(frames, max_gap=5)
    assert [i.tolist() for i in ids] == [[0, 1], [1, 0], [0, 2, 1], [0], [], [3]]
    # A track not seen for more than max_gap frames is over: the same place later is a new track.
    later = link_tracks([frame([a]), frame([]), frame([]), frame([a])], max_gap=1)
    assert [i.tolist() for i in later] == [[0], [], [], [1]]
    assert [i.tolist() for i in link_tracks(frames, max_gap=5)] == [i.tolist() for i in ids]  # deterministic
