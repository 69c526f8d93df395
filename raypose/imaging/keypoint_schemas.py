"""Keypoint schemas: names, skeleton, flip pairs and OKS sigmas, as data.

One schema per ViTPose++ expert head, transcribed from the datasets' published definitions as
mmpose carries them (`configs/_base_/datasets/{coco,aic,mpii,ap10k,coco_wholebody}.py`) and as
ViTPose trained its experts (ViTAE-Transformer/ViTPose `configs/_base_/datasets/*_info.py`):
keypoint order is the heatmap channel order, so it must never be "tidied".
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class KeypointSchema:
    """What a pose head's output channels mean."""

    name: str
    keypoints: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based keypoint index pairs
    # Index pairs swapped by a horizontal flip: (left, right) where the names carry a side; WholeBody's
    # face points carry none and are listed (i, mirror of i) with i < mirror.
    flip_pairs: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...] | None = None  # COCO-style OKS sigmas, where the dataset defines them
    parts: tuple[tuple[str, int, int], ...] | None = None  # (part, start, end), end exclusive, in order

    def __post_init__(self):
        k = len(self.keypoints)
        if len(set(self.keypoints)) != k:
            raise ValueError(f"{self.name}: keypoint names are not unique")
        for a, b in self.skeleton + self.flip_pairs:
            if not (0 <= a < k and 0 <= b < k and a != b):
                raise ValueError(f"{self.name}: bad index pair ({a}, {b}) for {k} keypoints")
        if self.sigmas is not None and len(self.sigmas) != k:
            raise ValueError(f"{self.name}: {len(self.sigmas)} sigmas for {k} keypoints")

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
            "parts": [list(part) for part in self.parts] if self.parts else None,
        }


def _edges(names: tuple[str, ...], links) -> tuple[tuple[int, int], ...]:
    """Skeleton links given by name (as mmpose's `skeleton_info`) -> 0-based index pairs."""
    index = {n: i for i, n in enumerate(names)}
    return tuple((index[a], index[b]) for a, b in links)


def _side_pairs(names: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """(left, right) index pairs for every `left_*` name whose `right_*` twin exists (mmpose's `swap`)."""
    index = {n: i for i, n in enumerate(names)}
    return tuple(
        (i, index["right_" + n[len("left_"):]])
        for i, n in enumerate(names)
        if n.startswith("left_") and "right_" + n[len("left_"):] in index
    )


# --- COCO-17 ------------------------------------------------------------------------------------
# COCO person keypoints, as in person_keypoints_*.json (skeleton there is 1-based); sigmas from
# pycocotools cocoeval.py (`kpt_oks_sigmas`), as mmpose coco.py.
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

# --- AI Challenger (AiC-14) ---------------------------------------------------------------------
# mmpose configs/_base_/datasets/aic.py (= ViTPose aic_info.py). Right side first, as published.
# Sigmas: AI_Challenger_2017 Evaluation/keypoint_eval/keypoint_eval.py (delta = 2 x sigma).
_AIC_NAMES = (
    "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "head_top", "neck",
)  # fmt: skip
AIC14 = KeypointSchema(
    name="aic14",
    keypoints=_AIC_NAMES,
    skeleton=_edges(_AIC_NAMES, (
        ("right_wrist", "right_elbow"), ("right_elbow", "right_shoulder"), ("right_shoulder", "neck"),
        ("neck", "left_shoulder"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
        ("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("right_hip", "left_hip"),
        ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("head_top", "neck"),
        ("right_shoulder", "right_hip"), ("left_shoulder", "left_hip"),
    )),  # fmt: skip
    flip_pairs=_side_pairs(_AIC_NAMES),
    sigmas=(
        0.01388152, 0.01515228, 0.01057665, 0.01417709, 0.01497891, 0.01402144, 0.03909642,
        0.03686941, 0.01981803, 0.03843971, 0.03412318, 0.02415081, 0.01291456, 0.01236173,
    ),  # fmt: skip
)

# --- MPII-16 ------------------------------------------------------------------------------------
# mmpose configs/_base_/datasets/mpii.py (= ViTPose mpii_info.py); MPII's own joint ids 0..15.
# MPII is scored by PCKh and publishes no OKS sigmas; mmpose's mpii.py carries sigmas "adapted from
# COCO" for its own use, which are not the dataset's, so none here.
_MPII_NAMES = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "pelvis", "thorax", "upper_neck", "head_top",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
)  # fmt: skip
MPII16 = KeypointSchema(
    name="mpii16",
    keypoints=_MPII_NAMES,
    skeleton=_edges(_MPII_NAMES, (
        ("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("right_hip", "pelvis"),
        ("pelvis", "left_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
        ("pelvis", "thorax"), ("thorax", "upper_neck"), ("upper_neck", "head_top"),
        ("upper_neck", "right_shoulder"), ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
        ("upper_neck", "left_shoulder"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    )),  # fmt: skip
    flip_pairs=_side_pairs(_MPII_NAMES),
    sigmas=None,
)

# --- AP-10K-17 (animals) ------------------------------------------------------------------------
# AP-10K (Yu et al., NeurIPS 2021 D&B), github.com/AlexTheBad/AP-10K configs/_base_/datasets/ap10k.py,
# = mmpose ap10k.py = ViTPose ap10k_info.py. Names as in the AP-10K annotation files (mmpose spells
# them L_Eye, R_Eye, Nose, Neck, Root of tail, L_Shoulder, L_Elbow, L_F_Paw, ..., R_B_Paw).
# Sigmas: AP-10K's COCO-derived values in AP-10K order (older mmpose ap10k.py had them in COCO order,
# which gave L/R twins different sigmas; AP-10K's repo, ViTPose and current mmpose use this order).
_AP10K_NAMES = (
    "left_eye", "right_eye", "nose", "neck", "root_of_tail",
    "left_shoulder", "left_elbow", "left_front_paw", "right_shoulder", "right_elbow", "right_front_paw",
    "left_hip", "left_knee", "left_back_paw", "right_hip", "right_knee", "right_back_paw",
)  # fmt: skip
AP10K17 = KeypointSchema(
    name="ap10k17",
    keypoints=_AP10K_NAMES,
    skeleton=_edges(_AP10K_NAMES, (
        ("left_eye", "right_eye"), ("left_eye", "nose"), ("right_eye", "nose"), ("nose", "neck"),
        ("neck", "root_of_tail"), ("neck", "left_shoulder"), ("left_shoulder", "left_elbow"),
        ("left_elbow", "left_front_paw"), ("neck", "right_shoulder"), ("right_shoulder", "right_elbow"),
        ("right_elbow", "right_front_paw"), ("root_of_tail", "left_hip"), ("left_hip", "left_knee"),
        ("left_knee", "left_back_paw"), ("root_of_tail", "right_hip"), ("right_hip", "right_knee"),
        ("right_knee", "right_back_paw"),
    )),  # fmt: skip
    flip_pairs=_side_pairs(_AP10K_NAMES),
    sigmas=(
        0.025, 0.025, 0.026, 0.035, 0.035, 0.079, 0.072, 0.062, 0.079,
        0.072, 0.062, 0.107, 0.087, 0.089, 0.107, 0.087, 0.089,
    ),  # fmt: skip
)

# --- APT-36K-17 (animals) -----------------------------------------------------------------------
# APT-36K (Yang et al., NeurIPS 2022 D&B) annotates the AP-10K 17 keypoints. mmpose has no apt36k
# config; ViTPose trains and evaluates its APT-36K expert (dataset_idx 4) as AnimalAP10KDataset with
# `ap10k_info` (vitPose+_*_coco+aic+mpii+ap10k+apt36k+wholebody_256x192_udp.py), sigmas included.
APT36K17 = replace(AP10K17, name="apt36k17")

# --- COCO-WholeBody-133 -------------------------------------------------------------------------
# COCO-WholeBody (Jin et al., ECCV 2020), mmpose configs/_base_/datasets/coco_wholebody.py
# (= ViTPose coco_wholebody_info.py): 17 body (= COCO-17) + 6 feet + 68 face + 21 left + 21 right hand.
_FEET = ("left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel")
_FACE = tuple(f"face-{i}" for i in range(68))  # the 68-point iBUG/300-W layout
_FINGERS = ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")


def _hand(side: str) -> tuple[str, ...]:
    """`{side}_hand_root`, then `{side}_{finger}1..4` from palm to tip, thumb to pinky."""
    return (f"{side}_hand_root", *(f"{side}_{finger}{j}" for finger in _FINGERS for j in range(1, 5)))


# Face mirror pairs of the 68-point layout (0-based within the face block), as mmpose's `swap`:
# face names carry no side, so these cannot come from the names. Points 8, 27-30, 33, 51, 57, 62 and
# 66 lie on the midline and map to themselves.
_FACE_MIRROR = (
    *((i, 16 - i) for i in range(8)),  # jaw line 0-16
    *((17 + i, 26 - i) for i in range(5)),  # eyebrows 17-21 | 22-26
    (31, 35), (32, 34),  # nostrils 31-35 (nose bridge 27-30 is midline)
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),  # eyes 36-41 | 42-47
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),  # outer lips 48-59
    (60, 64), (61, 63), (65, 67),  # inner lips 60-67
)  # fmt: skip

_WB_PARTS = (
    ("body", 0, 17), ("feet", 17, 23), ("face", 23, 91), ("left_hand", 91, 112), ("right_hand", 112, 133),
)  # fmt: skip
_WB_NAMES = COCO17.keypoints + _FEET + _FACE + _hand("left") + _hand("right")
_FACE_START = 23


def _hand_links(side: str) -> tuple[tuple[str, str], ...]:
    # mmpose links each finger to the body wrist; `*_hand_root` is left unlinked there.
    return tuple(
        (f"{side}_wrist" if j == 1 else f"{side}_{finger}{j - 1}", f"{side}_{finger}{j}")
        for finger in _FINGERS
        for j in range(1, 5)
    )


_HAND_SIGMAS = (
    0.029, 0.022, 0.035, 0.037, 0.047, 0.026, 0.025, 0.024, 0.035, 0.018, 0.024,
    0.022, 0.026, 0.017, 0.021, 0.021, 0.032, 0.020, 0.019, 0.022, 0.031,
)  # fmt: skip

WHOLEBODY133 = KeypointSchema(
    name="wholebody133",
    keypoints=_WB_NAMES,
    # Same edge set as mmpose's skeleton_info (body edges in COCO's order); no face edges are published.
    skeleton=COCO17.skeleton
    + _edges(_WB_NAMES, (
        ("left_ankle", "left_big_toe"), ("left_ankle", "left_small_toe"), ("left_ankle", "left_heel"),
        ("right_ankle", "right_big_toe"), ("right_ankle", "right_small_toe"), ("right_ankle", "right_heel"),
    ))  # fmt: skip
    + _edges(_WB_NAMES, _hand_links("left") + _hand_links("right")),
    flip_pairs=tuple(sorted(
        _side_pairs(_WB_NAMES) + tuple((_FACE_START + a, _FACE_START + b) for a, b in _FACE_MIRROR)
    )),  # fmt: skip
    # COCO-WholeBody evaluation/myeval_wholebody.py, as mmpose coco_wholebody.py.
    sigmas=(
        COCO17.sigmas
        + (0.068, 0.066, 0.066, 0.092, 0.094, 0.094)  # feet
        + (
            0.042, 0.043, 0.044, 0.043, 0.040, 0.035, 0.031, 0.025, 0.020,  # face: jaw 0-16
            0.023, 0.029, 0.032, 0.037, 0.038, 0.043, 0.041, 0.045,
            0.013, 0.012, 0.011, 0.011, 0.012, 0.012, 0.011, 0.011, 0.013, 0.015,  # brows 17-26
            0.009, 0.007, 0.007, 0.007, 0.012, 0.009, 0.008, 0.016, 0.010,  # nose 27-35
            0.017, 0.011, 0.009, 0.011, 0.009, 0.007, 0.013, 0.008, 0.011, 0.012, 0.010, 0.034,  # eyes
            0.008, 0.008, 0.009, 0.008, 0.008, 0.007, 0.010, 0.008, 0.009, 0.009,  # mouth 48-67
            0.009, 0.007, 0.007, 0.008, 0.011, 0.008, 0.008, 0.008, 0.010, 0.008,
        )  # fmt: skip
        + _HAND_SIGMAS  # left hand
        + _HAND_SIGMAS  # right hand
    ),
    parts=_WB_PARTS,
)

SCHEMAS: dict[str, KeypointSchema] = {
    s.name: s for s in (COCO17, AIC14, MPII16, AP10K17, APT36K17, WHOLEBODY133)
}

# The ViTPose++ experts (datasets) known by name, in the order of their MoE `dataset_index`, and
# the schema each one's head emits: the one list of built-in experts (pose.experts may add others).
EXPERT_SCHEMA: dict[str, str] = {
    "coco": "coco17",
    "aic": "aic14",
    "mpii": "mpii16",
    "ap10k": "ap10k17",
    "apt36k": "apt36k17",
    "wholebody": "wholebody133",
}
EXPERT_INDEX: dict[str, int] = {expert: index for index, expert in enumerate(EXPERT_SCHEMA)}


def schema_for_expert(expert: str) -> KeypointSchema:
    """The keypoint schema a ViTPose++ expert head emits."""
    try:
        return SCHEMAS[EXPERT_SCHEMA[expert]]
    except KeyError:
        raise ValueError(f"unknown expert {expert!r} (known: {', '.join(EXPERT_SCHEMA)})") from None
