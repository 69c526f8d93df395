"""ViTPose++ experts that answer for their own dataset: `raypose convert vitpose-plus`, head-schema
routing checks, `pose.fold_expert` and `pose.decode: original`.

The original-format checkpoint is built here from a random transformers MoE model, by the inverse
of the key mapping (written out independently of raypose/convert.py), plus five random extra heads;
so the reference for dataset i is that very MoE model run with dataset_index=i and head i.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import gaussian_blur
from typer.testing import CliRunner

from raypose.cli import app
from raypose.config.spec import PoseSpec
from raypose.errors import SpecError
from raypose.imaging.heatmaps import decode_heatmaps, opencv_sigma
from raypose.imaging.keypoint_schemas import EXPERT_INDEX, EXPERT_SCHEMA, SCHEMAS
from raypose.models.convert import (
    ConvertError,
    convert_vitpose_plus,
    dense_expert,
    load_original,
)
from raypose.models.routing import resolve_routing
from raypose.models.vitpose import PoseEngine, inspect_model
from raypose.pipeline.pose_stage import PoseStage

HIDDEN, LAYERS, HEADS, EXPERTS, PART = 64, 2, 4, 6, 16
CHANNELS = {"coco": 17, "aic": 14, "mpii": 16, "ap10k": 17, "apt36k": 17, "wholebody": 133}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def moe_config(num_labels: int):
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    backbone = VitPoseBackboneConfig(
        image_size=[256, 192], patch_size=[16, 16], hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, mlp_ratio=4, num_experts=EXPERTS, part_features=PART,
        layer_norm_eps=1e-6, out_indices=[LAYERS],
    )
    return VitPoseConfig(backbone_config=backbone, num_labels=num_labels, use_simple_decoder=False)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every weight and statistic random (LayerNorm/BatchNorm too), so a misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(0.05 * noise)


def to_original(backbone: dict, heads: dict) -> dict:
    """transformers names -> the ViTPose repository's (ViTMoE + TopdownHeatmapSimpleHead), by hand."""
    sd = {
        "backbone.patch_embed.proj.weight": backbone["embeddings.patch_embeddings.projection.weight"],
        "backbone.patch_embed.proj.bias": backbone["embeddings.patch_embeddings.projection.bias"],
        "backbone.pos_embed": backbone["embeddings.position_embeddings"],
        "backbone.last_norm.weight": backbone["layernorm.weight"],
        "backbone.last_norm.bias": backbone["layernorm.bias"],
    }
    for i in range(LAYERS):
        src, dst = f"encoder.layer.{i}.", f"backbone.blocks.{i}."
        for kind in ("weight", "bias"):
            sd[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [backbone[f"{src}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            sd[f"{dst}attn.proj.{kind}"] = backbone[f"{src}attention.output.dense.{kind}"]
            sd[f"{dst}norm1.{kind}"] = backbone[f"{src}layernorm_before.{kind}"]
            sd[f"{dst}norm2.{kind}"] = backbone[f"{src}layernorm_after.{kind}"]
            sd[f"{dst}mlp.fc1.{kind}"] = backbone[f"{src}mlp.fc1.{kind}"]
            sd[f"{dst}mlp.fc2.{kind}"] = backbone[f"{src}mlp.fc2.{kind}"]
            for e in range(EXPERTS):
                sd[f"{dst}mlp.experts.{e}.{kind}"] = backbone[f"{src}mlp.experts.{e}.{kind}"]
    names = {"deconv1.weight": "deconv_layers.0.weight", "deconv2.weight": "deconv_layers.3.weight",
             "conv.weight": "final_layer.weight", "conv.bias": "final_layer.bias",
             **{f"batchnorm1.{p}": f"deconv_layers.1.{p}" for p in BN},
             **{f"batchnorm2.{p}": f"deconv_layers.4.{p}" for p in BN}}
    for dataset, head in heads.items():
        prefix = "keypoint_head." if dataset == "coco" else f"associate_keypoint_heads.{EXPERT_INDEX[dataset] - 1}."
        for new, old in names.items():
            sd[prefix + old] = head[new]
    return {k: v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def vitpose_plus(tmp_path_factory):
    """(path of an original-format ViTPose++ .pth, the MoE backbone's weights, each dataset's head weights)."""
    from transformers import VitPoseForPoseEstimation
    from transformers.models.vitpose.modeling_vitpose import VitPoseClassicDecoder

    moe = VitPoseForPoseEstimation(moe_config(17)).eval()
    randomize(moe, seed=0)
    backbone = moe.backbone.state_dict()
    heads = {}
    for seed, (dataset, channels) in enumerate(CHANNELS.items(), start=1):
        head = VitPoseClassicDecoder(moe_config(channels))
        randomize(head, seed)
        heads[dataset] = head.state_dict()
    path = tmp_path_factory.mktemp("orig") / "vitpose+_tiny.pth"
    torch.save({"meta": {"epoch": 210, "mmpose_version": "0.24.0"}, "state_dict": to_original(backbone, heads)}, path)
    return path, backbone, heads


@pytest.fixture(scope="module")
def converted(vitpose_plus, tmp_path_factory):
    """`raypose convert vitpose-plus ORIGINAL --all --out DIR`: DIR/<dataset> for all six."""
    out = tmp_path_factory.mktemp("converted")
    result = CliRunner().invoke(
        app, ["convert", "vitpose-plus", str(vitpose_plus[0]), "--all", "--out", str(out), "--num-heads", str(HEADS)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("converted: ") == 6
    return out


def pixels(n=2, seed=0):
    return torch.randn(n, 3, 256, 192, generator=torch.Generator().manual_seed(seed))


def moe_reference(backbone: dict, head: dict, channels: int, index: int, x: torch.Tensor) -> torch.Tensor:
    """The transformers MoE model with the checkpoint's backbone, run with dataset_index, decoded by `head`."""
    from transformers import VitPoseForPoseEstimation

    model = VitPoseForPoseEstimation(moe_config(channels)).eval()
    model.backbone.load_state_dict(backbone)
    model.head.load_state_dict(head)
    with torch.no_grad():
        return model(pixel_values=x, dataset_index=torch.full((x.shape[0],), index)).heatmaps


# --- the converter --------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", list(CHANNELS))
def test_converted_expert_equals_the_moe_with_its_dataset_index_and_head(vitpose_plus, converted, dataset):
    from transformers import VitPoseForPoseEstimation

    _, backbone, heads = vitpose_plus
    index, channels = EXPERT_INDEX[dataset], CHANNELS[dataset]
    model = VitPoseForPoseEstimation.from_pretrained(converted / dataset).eval()
    assert model.config.backbone_config.num_experts == 1
    x = pixels()
    with torch.no_grad():
        dense = model(pixel_values=x).heatmaps
    expected = moe_reference(backbone, heads[dataset], channels, index, x)
    assert dense.shape == (2, channels, 64, 48)
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-5)
    # The check can tell experts apart: another expert with the same head differs by far more.
    other = moe_reference(backbone, heads[dataset], channels, (index + 1) % EXPERTS, x)
    assert (other - expected).abs().max() > 1e-3


def test_converted_checkpoint_records_its_schema(converted):
    for dataset in CHANNELS:
        folder = converted / dataset
        config = json.loads((folder / "config.json").read_text())
        schema = SCHEMAS[EXPERT_SCHEMA[dataset]]
        assert config["raypose_schema"] == schema.name
        assert [config["id2label"][str(i)] for i in range(schema.num_keypoints)] == list(schema.keypoints)
        assert config["raypose_source"]["expert_index"] == EXPERT_INDEX[dataset]
        assert config["backbone_config"]["layer_norm_eps"] == 1e-6
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
        assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == {"height": 256, "width": 192}
        info = inspect_model(str(folder))
        assert (info.head_schema, info.num_experts, info.input_size) == (schema.name, 1, (192, 256))


def test_convert_one_dataset_into_out(vitpose_plus, tmp_path):
    result = CliRunner().invoke(app, ["convert", "vitpose-plus", str(vitpose_plus[0]), "--dataset", "ap10k",
                                      "--out", str(tmp_path / "ap10k-dense"), "--num-heads", str(HEADS)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ap10k-dense" / "config.json").read_text())["raypose_schema"] == "ap10k17"


def test_state_dict_at_the_top_level_is_read_too(vitpose_plus, tmp_path):
    state = torch.load(vitpose_plus[0], weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "bare.pth")
    assert load_original(tmp_path / "bare.pth").keys() == state.keys()
    # mmcv's meta may hold numpy scalars: still read with weights_only.
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.75)}}, "state_dict": state}, tmp_path / "meta.pth")
    assert load_original(tmp_path / "meta.pth").keys() == state.keys()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give either --dataset NAME or --all"),
        (["--dataset", "coco", "--all"], "give either --dataset NAME or --all"),
        (["--dataset", "horse"], "--dataset: unknown 'horse'; expected one of: coco, aic, mpii, ap10k, apt36k, wholebody"),
        (["--dataset", "coco", "--input-size", "256"], "--input-size: expected HEIGHTxWIDTH"),
    ],
)
def test_cli_refusals(vitpose_plus, tmp_path, args, message):
    result = CliRunner().invoke(app, ["convert", "vitpose-plus", str(vitpose_plus[0]), "--out", str(tmp_path / "o"),
                                      "--num-heads", str(HEADS), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_attention_heads_of_an_unknown_size_must_be_given(vitpose_plus, tmp_path):
    result = CliRunner().invoke(app, ["convert", "vitpose-plus", str(vitpose_plus[0]), "--dataset", "coco",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "embedding size 64 is not a ViTPose++-S/B/L/H one: give the number of attention heads" in result.output


def edited(vitpose_plus, change):
    state = dict(torch.load(vitpose_plus[0], weights_only=True)["state_dict"])
    change(state)
    return state


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update({"backbone.blocks.0.mlp.gate.weight": torch.zeros(1)}),
         r"1 unexpected key\(s\) for a ViTPose\+\+ checkpoint: backbone.blocks.0.mlp.gate.weight"),
        (lambda s: s.update({"associate_keypoint_heads.5.final_layer.bias": torch.zeros(1)}),
         r"unexpected key\(s\) .*associate_keypoint_heads.5.final_layer.bias"),
        (lambda s: s.pop("backbone.blocks.1.norm2.bias"), r"1 backbone key\(s\) missing: backbone.blocks.1.norm2.bias"),
        (lambda s: s.pop("associate_keypoint_heads.2.deconv_layers.4.running_var"),
         r"missing head weights: associate_keypoint_heads.2.deconv_layers.4.running_var"),
        (lambda s: [s.pop(k) for k in list(s) if ".experts." in k], r"a dense ViTPose, not a ViTPose\+\+ \(MoE\)"),
        (lambda s: s.update({"associate_keypoint_heads.2.final_layer.weight": torch.zeros(16, 256, 1, 1),
                             "associate_keypoint_heads.2.final_layer.bias": torch.zeros(16)}),
         r"associate_keypoint_heads.2.final_layer has 16 channels, ap10k has 17 keypoints"),
        (lambda s: [s.pop(k) for k in list(s) if k.startswith("backbone.")], r"missing 'backbone.patch_embed.proj.weight'"),
    ],
)
def test_unknown_and_missing_keys_are_named(vitpose_plus, change, message):
    with pytest.raises(ConvertError, match=message):
        dense_expert(edited(vitpose_plus, change), "ap10k", num_attention_heads=HEADS)


def test_wrong_input_size_and_unreadable_files(vitpose_plus, tmp_path):
    state = edited(vitpose_plus, lambda s: None)
    with pytest.raises(ConvertError, match=r"pos_embed has 192 positions, but a 384x288 input makes 432 patches"):
        dense_expert(state, "coco", num_attention_heads=HEADS, image_size=(384, 288))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConvertError, match="cannot read it as a PyTorch checkpoint"):
        convert_vitpose_plus(tmp_path / "junk.pth", tmp_path / "o", ["coco"])
    with pytest.raises(ConvertError, match="no such file"):
        convert_vitpose_plus(tmp_path / "missing.pth", tmp_path / "o", ["coco"])


# --- routing refuses a head that is not the expert's ---------------------------------------------


def routing_of(**pose):
    return resolve_routing(PoseSpec(**pose))


def test_converted_experts_route_without_dataset_index(converted):
    routing = routing_of(
        model=str(converted / "coco"), routing={"person": "coco", "dog": "ap10k", "horse": "apt36k"},
        experts={name: {"model": str(converted / name)} for name in ("ap10k", "apt36k")},
    )
    assert {n: (e.dataset_index, e.keypoint_schema) for n, e in routing.experts.items()} == {
        "coco": (None, "coco17"), "ap10k": (None, "ap10k17"), "apt36k": (None, "apt36k17")}
    # A custom expert on a converted checkpoint takes its schema from the config.
    mine = routing_of(model=str(converted / "wholebody"), expert="mine", experts={"mine": {}})
    assert mine.experts["mine"].keypoint_schema == "wholebody133"


@pytest.mark.parametrize(
    "pose, message",
    [
        # Same 17 channels, another dataset's head: only the recorded schema tells.
        (dict(expert="coco", model="ap10k"),
         r"pose.expert: expert 'coco' emits coco17 keypoints, but the head of .*ap10k' is ap10k17 \(recorded in its config"),
        (dict(expert="apt36k", model="ap10k"), r"emits apt36k17 keypoints, but the head of .* is ap10k17"),
        (dict(expert="ap10k", model="ap10k", experts={"ap10k": {"dataset_index": 3}}),
         r"pose.experts.ap10k.dataset_index: .* is not a ViTPose\+\+ \(MoE\) checkpoint; remove dataset_index"),
    ],
)
def test_converted_checkpoint_refusals(converted, pose, message):
    pose["model"] = str(converted / pose["model"])
    with pytest.raises(SpecError, match=message):
        routing_of(**pose)


def test_published_moe_checkpoint_is_refused_for_other_datasets(moe_checkpoint):
    for expert in ("ap10k", "apt36k"):
        with pytest.raises(SpecError) as error:
            routing_of(model=str(moe_checkpoint), routing={"dog": expert})
        text = str(error.value)
        assert f": expert {expert!r} emits {EXPERT_SCHEMA[expert]} keypoints" in text
        assert "is coco17 (assumed: ViTPose++ checkpoints in transformers format carry only the COCO head)" in text
        assert f"`raypose convert vitpose-plus ORIGINAL.pth --dataset {expert} --out DIR`" in text
        assert f"pose.experts.{expert}.head_schema: {EXPERT_SCHEMA[expert]}" in text
    # A custom expert with COCO keypoints but another expert's features is refused as well.
    with pytest.raises(SpecError, match=r"pose.experts.mine.dataset_index: 3 selects another ViTPose\+\+ expert .*use dataset_index 0"):
        routing_of(model=str(moe_checkpoint), expert="mine", experts={"mine": {"keypoint_schema": "coco17", "dataset_index": 3}})
    # COCO on it keeps working, and head_schema overrides the assumption.
    routing = routing_of(model=str(moe_checkpoint), routing={"person": "coco", "dog": "ap10k"},
                         experts={"ap10k": {"head_schema": "ap10k17"}})
    assert {n: e.dataset_index for n, e in routing.experts.items()} == {"coco": 0, "ap10k": 3}


def test_dense_17_channel_checkpoint_without_schema_counts_as_coco(tiny_checkpoint):
    with pytest.raises(SpecError, match=r"emits ap10k17 keypoints, but the head of .* is coco17 \(assumed: a 17-keypoint"):
        routing_of(model=str(tiny_checkpoint), expert="ap10k")
    assert routing_of(model=str(tiny_checkpoint), expert="ap10k",
                      experts={"ap10k": {"head_schema": "ap10k17"}}).experts["ap10k"].dataset_index is None
    with pytest.raises(SpecError, match=r"pose.experts.ap10k.head_schema: unknown schema 'ap10k'"):
        routing_of(model=str(tiny_checkpoint), expert="ap10k", experts={"ap10k": {"head_schema": "ap10k"}})


# --- pose.fold_expert ---------------------------------------------------------------------------


def test_fold_expert_equals_the_moe_forward(moe_checkpoint):
    info = inspect_model(str(moe_checkpoint))
    moe = PoseEngine(info)
    folded = PoseEngine(info, fold_expert=3)
    assert folded.model.config.backbone_config.num_experts == 1
    assert not any(".experts." in k for k in folded.model.state_dict())
    x = pixels(3, seed=1)
    with torch.inference_mode():
        torch.testing.assert_close(folded._heatmaps(x, None), moe._heatmaps(x, 3), rtol=0, atol=1e-5)
        torch.testing.assert_close(folded._heatmaps(x, 3), moe._heatmaps(x, 3), rtol=0, atol=1e-5)
        assert (moe._heatmaps(x, 0) - moe._heatmaps(x, 3)).abs().max() > 1e-3
        with pytest.raises(ValueError, match="dataset_index 0: this model has expert 3 folded in"):
            folded._heatmaps(x, 0)


def test_fold_expert_in_a_job(moe_checkpoint, tiny_checkpoint):
    pose = dict(model=str(moe_checkpoint), expert="ap10k", experts={"ap10k": {"head_schema": "ap10k17"}})
    folded_stage = PoseStage(routing_of(**pose, fold_expert=True))
    [engine] = folded_stage.engines.values()
    assert folded_stage.routing.experts["ap10k"].folded and engine.folded == 3
    seen = []
    engine.model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("dataset_index")), with_kwargs=True
    )
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (2, 256, 192, 3), dtype=np.uint8)
    centers = np.array([[100.0, 120.0], [50.0, 60.0]], np.float32)
    scales = np.array([[1.0, 1.3], [0.5, 0.7]], np.float32)
    keypoints, scores = engine.estimate(crops, centers, scales, dataset_index=3)
    assert seen == [None]
    expected, expected_scores = PoseEngine(inspect_model(str(moe_checkpoint))).estimate(crops, centers, scales, dataset_index=3)
    np.testing.assert_allclose(keypoints, expected, atol=1e-3)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    # Dense checkpoints are left alone; one MoE checkpoint serving two dataset_indexes cannot be folded.
    assert not routing_of(model=str(tiny_checkpoint), fold_expert=True).experts["coco"].folded
    coco = routing_of(model=str(moe_checkpoint), fold_expert=True).experts["coco"]
    assert coco.folded and coco.dataset_index == 0
    with pytest.raises(SpecError, match=r"pose.fold_expert: .* serves experts ap10k \(dataset_index 3\), coco \(dataset_index 0\)"):
        routing_of(**pose, routing={"person": "coco", "dog": "ap10k"}, fold_expert=True)


# --- pose.decode: original ----------------------------------------------------------------------


def opencv_blur(heatmap: np.ndarray, kernel: int = 11) -> np.ndarray:
    """cv2.GaussianBlur(heatmap, (k, k), 0) on float32, with scipy: cv2's kernel, BORDER_REFLECT_101 (= 'mirror')."""
    from scipy.ndimage import correlate1d

    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8  # cv2.getGaussianKernel with sigma <= 0
    x = np.arange(kernel) - (kernel - 1) / 2
    weights = np.exp(-(x**2) / (2 * sigma**2))
    weights /= weights.sum()
    rows = correlate1d(heatmap, weights, axis=0, mode="mirror")
    return correlate1d(rows, weights, axis=1, mode="mirror")


def test_opencv_sigma_and_border():
    assert opencv_sigma(11) == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 3, 20, 15)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), kernel=11, sigma=2.0, border="reflect_101").numpy()
    ref = np.array([[opencv_blur(m) for m in ms] for ms in maps])
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["peaked", "near-border"])
def test_decode_original_equals_the_original_post_dark_udp(monkeypatch, kind):
    """The reference: transformers' post-processing, whose DARK step is the original post_dark_udp but for
    the smoothing, with the original's cv2.GaussianBlur(k=11) put back."""
    pil = pytest.importorskip("transformers.models.vitpose.image_processing_pil_vitpose")
    from transformers.models.vitpose.modeling_vitpose import VitPoseEstimatorOutput

    from raypose.imaging.geometry import center_scale_from_boxes

    rng = np.random.default_rng(1 if kind == "peaked" else 2)
    n, k, h, w = 4, 17, 64, 48
    yy, xx = np.mgrid[0:h, 0:w]
    low, high = (1, 3) if kind == "near-border" else (5, 40)
    cx = rng.uniform(low, min(high, w - 2), size=(n, k, 1, 1))
    cy = rng.uniform(low, min(high, h - 2), size=(n, k, 1, 1))
    heatmaps = (np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0) + 0.02 * rng.normal(size=(n, k, h, w))).astype(np.float32)
    boxes = [[10.0, 20.0, 50.0, 80.0], [100.5, 60.2, 30.0, 20.0], [3.3, 7.7, 40.2, 10.1], [0.0, 0.0, 640.0, 480.0]]
    monkeypatch.setattr(pil, "gaussian_filter", lambda heatmap, sigma, radius, axes: opencv_blur(heatmap))
    results = pil.VitPoseImageProcessorPil().post_process_pose_estimation(
        VitPoseEstimatorOutput(heatmaps=torch.from_numpy(heatmaps.copy())), boxes=[np.array(boxes, np.float32)]
    )[0]
    expected = np.stack([r["keypoints"].numpy() for r in results])
    centers, scales = center_scale_from_boxes(np.array(boxes), (192, 256))
    args = (torch.from_numpy(heatmaps), torch.from_numpy(centers), torch.from_numpy(scales))
    original, _ = decode_heatmaps(*args, decode="original")
    np.testing.assert_allclose(original.numpy(), expected, rtol=0, atol=1e-3)
    default, _ = decode_heatmaps(*args)
    assert np.abs(default.numpy() - expected).max() > 1e-2  # sigma 0.8 and 2.0 do differ
    with pytest.raises(ValueError, match="decode: expected one of"):
        decode_heatmaps(*args, decode="cv2")


def test_pose_decode_reaches_the_engine(tiny_checkpoint):
    stage = PoseStage(routing_of(model=str(tiny_checkpoint), decode="original"))
    [engine] = stage.engines.values()
    assert stage.routing.decode == "original" and engine.decode == "original"
