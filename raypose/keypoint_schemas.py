"""Keypoint schemas: names, skeleton, flip pairs and OKS sigmas, as data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeypointSchema:
    """What a pose head's output channels mean."""

    name: str
    keypoints: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based keypoint index pairs
    flip_pairs: tuple[tuple[int, int], ...]  # (left, right) index pairs swapped by a horizontal flip
    sigmas: tuple[float, ...] | None = None  # COCO OKS sigmas, where the dataset defines them

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoints)

    def describe(self) -> dict:
        """The schema as plain JSON data (for Parquet metadata and the sidecar)."""
        return {
            "keypoints": list(self.keypoints),
            "skeleton": [list(edge) for edge in self.skeleton],
            "flip_pairs": [list(pair) for pair in self.flip_pairs],
            "sigmas": list(self.sigmas) if self.sigmas else None,
        }


# COCO person keypoints, as in person_keypoints_*.json (skeleton there is 1-based).
COCO17 = KeypointSchema(
    name="coco17",
    keypoints=(
        "nose", "left_eye", "right_eye", "left_ear", "right_ear",
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
        "left_wrist", "right_wrist", "left_hip", "right_hip",
        "left_knee", "right_knee", "left_ankle", "right_ankle",
    ),  # fmt: skip
    skeleton=tuple(
        (a - 1, b - 1)
        for a, b in (
            (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
            (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
        )  # fmt: skip
    ),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    sigmas=(
        0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
        0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
    ),  # fmt: skip
)

SCHEMAS: dict[str, KeypointSchema] = {s.name: s for s in (COCO17,)}

# ViTPose++ experts in the order of their MoE `dataset_index`, and the schema each head emits.
EXPERT_INDEX: dict[str, int] = {"coco": 0, "aic": 1, "mpii": 2, "ap10k": 3, "apt36k": 4, "wholebody": 5}
EXPERT_SCHEMA: dict[str, str] = {"coco": "coco17"}
