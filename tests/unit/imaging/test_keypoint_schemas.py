"""The keypoint-schema registry against the datasets' published definitions."""

from __future__ import annotations

import json
import re

import pytest

from raypose.imaging.keypoint_schemas import (
    AP10K17,
    APT36K17,
    COCO17,
    EXPERT_INDEX,
    EXPERT_SCHEMA,
    SCHEMAS,
    WHOLEBODY133,
    KeypointSchema,
    schema_for_expert,
)

PUBLISHED_COUNTS = {
    "coco17": 17, "aic14": 14, "mpii16": 16, "ap10k17": 17, "apt36k17": 17, "wholebody133": 133,
}  # fmt: skip
ALL = pytest.mark.parametrize("schema", list(SCHEMAS.values()), ids=list(SCHEMAS))

# mmpose configs/_base_/datasets/coco_wholebody.py `swap` of face-0..face-67, transcribed on its own
# (not derived from the module's table) so the two can disagree.
MMPOSE_FACE_SWAP = (
    16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
    26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
    27, 28, 29, 30, 35, 34, 33, 32, 31,
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,
    64, 63, 62, 61, 60, 67, 66, 65,
)  # fmt: skip


def side(name: str) -> str | None:
    match = re.match(r"(left|right)_", name)
    return match.group(1) if match else None


def mirror_name(name: str) -> str:
    return re.sub(r"^(left|right)_", lambda m: "right_" if m.group(1) == "left" else "left_", name)


def unordered(pairs) -> set[frozenset[int]]:
    return {frozenset(p) for p in pairs}


def permutation(schema: KeypointSchema) -> list[int]:
    perm = list(range(schema.num_keypoints))
    for a, b in schema.flip_pairs:
        perm[a], perm[b] = b, a
    return perm


def test_registry_holds_the_six_vitpose_plus_plus_schemas():
    assert {name: s.num_keypoints for name, s in SCHEMAS.items()} == PUBLISHED_COUNTS
    assert all(name == s.name for name, s in SCHEMAS.items())


@ALL
def test_names_are_unique_and_plain(schema):
    assert len(set(schema.keypoints)) == schema.num_keypoints
    assert all(name and name == name.strip() for name in schema.keypoints)


@ALL
def test_skeleton_indices_in_range_and_edges_distinct(schema):
    k = schema.num_keypoints
    assert schema.skeleton
    for a, b in schema.skeleton:
        assert 0 <= a < k and 0 <= b < k and a != b
    undirected = {frozenset(edge) for edge in schema.skeleton}
    assert len(undirected) == len(schema.skeleton)


@ALL
def test_flip_pairs_form_an_involution(schema):
    k = schema.num_keypoints
    seen: set[int] = set()
    for a, b in schema.flip_pairs:
        assert 0 <= a < k and 0 <= b < k
        assert a != b, "a pair maps an index to itself"
        assert a not in seen and b not in seen, "an index appears in two pairs"
        seen |= {a, b}
    perm = permutation(schema)
    assert [perm[perm[i]] for i in range(k)] == list(range(k))
    assert sorted(perm) == list(range(k))


@ALL
def test_flipping_swaps_left_and_right_names(schema):
    perm = permutation(schema)
    for i, name in enumerate(schema.keypoints):
        if side(name):
            assert schema.keypoints[perm[i]] == mirror_name(name), name
        elif perm[i] != i:
            # Only WholeBody's face points mirror without a side in their names.
            assert schema.name == "wholebody133" and name.startswith("face-"), name
            assert schema.keypoints[perm[i]].startswith("face-")
    for a, b in schema.flip_pairs:
        if side(schema.keypoints[a]) or side(schema.keypoints[b]):
            assert (side(schema.keypoints[a]), side(schema.keypoints[b])) == ("left", "right")


@ALL
def test_skeleton_flips_onto_itself(schema):
    # A mirror image of a skeleton is the same skeleton: every edge's mirror is an edge.
    perm = permutation(schema)
    edges = {frozenset(edge) for edge in schema.skeleton}
    assert {frozenset((perm[a], perm[b])) for a, b in schema.skeleton} == edges


@ALL
def test_sigmas_match_keypoint_count(schema):
    if schema.sigmas is not None:
        assert len(schema.sigmas) == schema.num_keypoints
        assert all(0 < s < 0.2 for s in schema.sigmas)


def test_sigmas_defined_where_the_dataset_defines_them():
    assert SCHEMAS["mpii16"].sigmas is None  # MPII is scored by PCKh
    for name in ("coco17", "aic14", "ap10k17", "apt36k17", "wholebody133"):
        assert SCHEMAS[name].sigmas is not None, name


@pytest.mark.parametrize("schema", [COCO17, AP10K17, APT36K17], ids=lambda s: s.name)
def test_mirror_symmetric_sigmas_follow_keypoint_order(schema):
    # COCO's and AP-10K's sigmas are equal for left/right twins: catches a list in the wrong order.
    for a, b in schema.flip_pairs:
        assert schema.sigmas[a] == schema.sigmas[b], (schema.keypoints[a], schema.keypoints[b])


@ALL
def test_skeleton_connects_the_linked_keypoints(schema):
    parent = list(range(schema.num_keypoints))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in schema.skeleton:
        parent[root(a)] = root(b)
    linked = {i for edge in schema.skeleton for i in edge}
    assert len({root(i) for i in linked}) == 1
    if schema.name != "wholebody133":
        assert linked == set(range(schema.num_keypoints))


def test_coco17_is_the_wholebody_body():
    k = COCO17.num_keypoints
    assert WHOLEBODY133.keypoints[:k] == COCO17.keypoints
    assert WHOLEBODY133.sigmas[:k] == COCO17.sigmas
    body_pairs = {p for p in WHOLEBODY133.flip_pairs if max(p) < k}
    assert body_pairs == set(COCO17.flip_pairs)
    body_edges = {frozenset(e) for e in WHOLEBODY133.skeleton if max(e) < k}
    assert body_edges == {frozenset(e) for e in COCO17.skeleton}


def test_wholebody_parts_and_names_follow_mmpose():
    wb = WHOLEBODY133
    assert wb.parts == (
        ("body", 0, 17), ("feet", 17, 23), ("face", 23, 91), ("left_hand", 91, 112), ("right_hand", 112, 133)
    )  # fmt: skip
    assert wb.keypoints[17:23] == (
        "left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel"
    )  # fmt: skip
    assert wb.keypoints[23:91] == tuple(f"face-{i}" for i in range(68))
    assert wb.keypoints[91:96] == (
        "left_hand_root", "left_thumb1", "left_thumb2", "left_thumb3", "left_thumb4"
    )  # fmt: skip
    assert wb.keypoints[96] == "left_forefinger1" and wb.keypoints[100] == "left_middle_finger1"
    assert wb.keypoints[104] == "left_ring_finger1" and wb.keypoints[111] == "left_pinky_finger4"
    assert wb.keypoints[112:] == tuple(n.replace("left_", "right_") for n in wb.keypoints[91:112])
    assert len(wb.skeleton) == 65  # 19 body + 6 feet + 2 x 20 hand links, as mmpose
    # mmpose links fingers to the body wrist: 4 links per finger, 5 fingers, per hand.
    wrist = wb.keypoints.index("left_wrist")
    assert sum(wrist in e and max(e) >= 91 for e in wb.skeleton) == 5


def test_wholebody_face_mirrors_as_the_68_point_layout():
    perm = permutation(WHOLEBODY133)
    assert tuple(perm[23 + i] - 23 for i in range(68)) == MMPOSE_FACE_SWAP
    midline = [i for i in range(68) if MMPOSE_FACE_SWAP[i] == i]
    assert midline == [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]


def test_wholebody_hands_swap_index_for_index():
    perm = permutation(WHOLEBODY133)
    assert [perm[91 + i] for i in range(21)] == [112 + i for i in range(21)]
    assert WHOLEBODY133.sigmas[91:112] == WHOLEBODY133.sigmas[112:133]


def test_apt36k_uses_the_ap10k_definition():
    assert APT36K17.keypoints == AP10K17.keypoints
    assert APT36K17.skeleton == AP10K17.skeleton
    assert APT36K17.flip_pairs == AP10K17.flip_pairs
    assert APT36K17.sigmas == AP10K17.sigmas


def test_published_orders_spot_checks():
    aic, mpii, ap10k = SCHEMAS["aic14"], SCHEMAS["mpii16"], SCHEMAS["ap10k17"]
    assert aic.keypoints[0] == "right_shoulder" and aic.keypoints[12:] == ("head_top", "neck")
    assert mpii.keypoints[0] == "right_ankle"
    assert mpii.keypoints[6:10] == ("pelvis", "thorax", "upper_neck", "head_top")
    assert mpii.keypoints[10] == "right_wrist" and mpii.keypoints[15] == "left_wrist"
    assert ap10k.keypoints[:5] == ("left_eye", "right_eye", "nose", "neck", "root_of_tail")
    assert ap10k.keypoints[7] == "left_front_paw" and ap10k.keypoints[16] == "right_back_paw"
    # mmpose's flip_pairs for AiC and MPII (order within a pair aside).
    assert unordered(aic.flip_pairs) == unordered(((0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11)))
    assert unordered(mpii.flip_pairs) == unordered(((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)))


def test_every_expert_has_a_schema():
    assert set(EXPERT_SCHEMA) == set(EXPERT_INDEX)
    assert sorted(EXPERT_INDEX.values()) == list(range(6))
    assert all(name in SCHEMAS for name in EXPERT_SCHEMA.values())
    assert schema_for_expert("coco") is COCO17
    assert schema_for_expert("wholebody") is WHOLEBODY133
    assert schema_for_expert("apt36k").num_keypoints == 17
    with pytest.raises(ValueError, match="unknown expert 'horse'"):
        schema_for_expert("horse")


@ALL
def test_describe_is_json(schema):
    described = schema.describe()
    assert json.loads(json.dumps(described)) == described
    assert described["keypoints"] == list(schema.keypoints)
    assert len(described["skeleton"]) == len(schema.skeleton)
    assert set(described) == {"keypoints", "skeleton", "flip_pairs", "sigmas", "parts"}
    if schema is WHOLEBODY133:
        assert described["parts"][2] == ["face", 23, 91]
    else:
        assert described["parts"] is None


@ALL
def test_transformers_flip_back_with_the_pairs_is_an_involution(schema):
    torch = pytest.importorskip("torch")
    flip_back = pytest.importorskip("transformers.models.vitpose.modeling_vitpose").flip_back
    heatmaps = torch.rand(2, schema.num_keypoints, 8, 6)
    pairs = torch.tensor(schema.flip_pairs)
    assert torch.equal(flip_back(flip_back(heatmaps, pairs), pairs), heatmaps)
    # One flip moves a left channel's content to its right twin, mirrored.
    a, b = schema.flip_pairs[0]
    assert torch.equal(flip_back(heatmaps, pairs)[:, a], heatmaps[:, b].flip(-1))


def test_bad_schemas_are_rejected():
    with pytest.raises(ValueError, match="not unique"):
        KeypointSchema("x", ("a", "a"), (), ())
    with pytest.raises(ValueError, match="bad index pair"):
        KeypointSchema("x", ("a", "b"), ((0, 2),), ())
    with pytest.raises(ValueError, match="bad index pair"):
        KeypointSchema("x", ("a", "b"), (), ((1, 1),))
    with pytest.raises(ValueError, match="1 sigmas for 2 keypoints"):
        KeypointSchema("x", ("a", "b"), ((0, 1),), (), sigmas=(0.1,))
