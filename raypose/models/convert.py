"""Original ViTPose++ checkpoints -> one dense transformers ViTPose per dataset, with that dataset's head.

The ViTPose repository's `.pth` (ViTAE-Transformer/ViTPose, `TopDownMoE` + `ViTMoE`) holds a MoE
backbone (`backbone.blocks.L.mlp.fc2` shared, `backbone.blocks.L.mlp.experts.E` per dataset), the
COCO head (`keypoint_head.*`) and the other datasets' heads (`associate_keypoint_heads.J.*`, J = 0..4
for AiC, MPII, AP-10K, APT-36K, WholeBody: `associate_keypoint_head` in the ViTPose++ configs, whose
`dataset_idx` is J + 1). As the original `tools/model_split.py` does, expert i is folded into every
`fc2` (the shared rows first, then expert i's `part_features` rows) and head i is attached; the key
names then follow transformers' `convert_vitpose_to_hf.py`. The result is a plain (num_experts=1)
`VitPoseForPoseEstimation` whose config records what its heatmaps mean (`raypose_schema`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from raypose.errors import ConvertError
from raypose.imaging.keypoint_schemas import EXPERT_INDEX, EXPERT_SCHEMA, SCHEMAS

DATASETS: tuple[str, ...] = tuple(sorted(EXPERT_INDEX, key=EXPERT_INDEX.get))  # coco, aic, mpii, ap10k, apt36k, wholebody
# The original configs' attention heads per embedding size (ViTPose++-S/B/L/H); not readable from the weights.
ATTENTION_HEADS = {384: 12, 768: 12, 1024: 16, 1280: 16}
LAYER_NORM_EPS = 1e-6  # ViTMoE: partial(nn.LayerNorm, eps=1e-6)
IGNORED_KEYS = frozenset({"backbone.cls_token"})  # unused by every ViTPose forward

_BLOCK = re.compile(r"backbone\.blocks\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(weight|bias)")
_BLOCK_NAMES = {
    "norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}  # fmt: skip
_TOP_NAMES = {
    "backbone.patch_embed.proj.weight": "backbone.embeddings.patch_embeddings.projection.weight",
    "backbone.patch_embed.proj.bias": "backbone.embeddings.patch_embeddings.projection.bias",
    "backbone.pos_embed": "backbone.embeddings.position_embeddings",
    "backbone.last_norm.weight": "backbone.layernorm.weight",
    "backbone.last_norm.bias": "backbone.layernorm.bias",
}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# TopdownHeatmapSimpleHead (2 deconv + BN + ReLU, final 1x1 conv) -> transformers' VitPoseClassicDecoder.
_HEAD_NAMES = {
    "deconv_layers.0.weight": "deconv1.weight",
    **{f"deconv_layers.1.{p}": f"batchnorm1.{p}" for p in _BN},
    "deconv_layers.3.weight": "deconv2.weight",
    **{f"deconv_layers.4.{p}": f"batchnorm2.{p}" for p in _BN},
    "final_layer.weight": "conv.weight",
    "final_layer.bias": "conv.bias",
}


def head_prefix(dataset: str) -> str:
    """Where a dataset's head lives in an original ViTPose++ state dict."""
    index = EXPERT_INDEX[dataset]
    return "keypoint_head." if index == 0 else f"associate_keypoint_heads.{index - 1}."


def load_original(path: str | Path) -> dict[str, torch.Tensor]:
    """An original ViTPose(++) `.pth`: the state dict, under "state_dict" or at the top level (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        # mmcv may leave numpy scalars in the checkpoint's meta: allow those (data, not code).
        with torch.serialization.safe_globals(_numpy_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, objects weights_only refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvertError(f"{path}: cannot read it as a PyTorch checkpoint (weights only): {first}") from exc
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path}: expected a state dict of tensors (at the top level or under 'state_dict')")
    return state


def _numpy_globals() -> list:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def map_backbone(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `backbone.*` weights under transformers' names (MoE layout kept: `mlp.experts.E` stay)."""
    mapped = {}
    for key, value in original.items():
        if not key.startswith("backbone.") or key in IGNORED_KEYS:
            continue
        if key in _TOP_NAMES:
            mapped[_TOP_NAMES[key]] = value
            continue
        match = _BLOCK.fullmatch(key)
        if match is None:
            raise ConvertError(f"unexpected key {key!r} in the backbone")
        layer, rest = match.groups()
        prefix = f"backbone.encoder.layer.{layer}."
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            # One (3 * dim, ...) projection -> query, key, value, as convert_vitpose_to_hf.py splits it.
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                mapped[f"{prefix}attention.attention.{name}.{kind}"] = part
            continue
        module, _, kind = rest.rpartition(".")
        if module in _BLOCK_NAMES and kind in ("weight", "bias"):
            mapped[f"{prefix}{_BLOCK_NAMES[module]}.{kind}"] = value
        elif _EXPERT.fullmatch(rest):
            mapped[prefix + rest] = value
        else:
            raise ConvertError(f"unexpected key {key!r} in the backbone")
    return mapped


def map_head(original: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One `TopdownHeatmapSimpleHead` (at `prefix`) under transformers' `head.*` names."""
    missing = [prefix + k for k in _HEAD_NAMES if prefix + k not in original]
    if missing:
        raise ConvertError(
            f"missing head weights: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
            "(expected a classic ViTPose++ head: two deconvolutions and a 1x1 final layer)"
        )
    return {f"head.{new}": original[prefix + old] for old, new in _HEAD_NAMES.items()}


def fold_expert(state_dict: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """MoE -> dense (transformers names): each `mlp.fc2` gets expert `index`'s rows appended; experts dropped.

    The MoE MLP outputs cat([fc2(x), experts[index](x)]), which is one Linear whose weight and bias
    are the row-wise concatenations (model_split.py's `torch.cat([fc2, experts.i], dim=0)`).
    """
    folded = {}
    layers = set()
    for key, value in state_dict.items():
        if ".mlp.experts." in key:
            continue
        if ".mlp.fc2." in key:
            expert_key = key.replace(".mlp.fc2.", f".mlp.experts.{index}.")
            if expert_key not in state_dict:
                raise ConvertError(f"missing {expert_key!r}: the checkpoint has no expert {index}")
            value = torch.cat([value, state_dict[expert_key]], dim=0)
            layers.add(key.split(".mlp.")[0])
        folded[key] = value
    if not layers:
        raise ConvertError("no MoE MLP (`mlp.fc2` with `mlp.experts.*`) found: not a ViTPose++ checkpoint")
    return folded


def build_model(config, state_dict: dict[str, torch.Tensor]):
    """A VitPoseForPoseEstimation from a config and a complete state dict (no random init, strict names)."""
    from transformers import VitPoseForPoseEstimation

    with torch.device("meta"):
        model = VitPoseForPoseEstimation(config)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise ConvertError(f"the weights do not fit a ViTPose of this shape: {exc}") from exc
    return model.eval()


def original_architecture(original: dict[str, torch.Tensor], num_attention_heads: int | None = None,
                          image_size: tuple[int, int] = (256, 192)) -> dict:
    """The backbone's shape, read from its weights (attention heads from the original configs)."""
    for key in ("backbone.patch_embed.proj.weight", "backbone.pos_embed", "backbone.blocks.0.mlp.fc1.weight",
                "backbone.blocks.0.mlp.fc2.weight"):
        if key not in original:
            raise ConvertError(f"missing {key!r}: not an original ViTPose++ checkpoint (keys start with "
                               f"{', '.join(sorted({k.split('.')[0] for k in original})[:5]) or 'nothing'})")
    hidden, channels, patch_h, patch_w = original["backbone.patch_embed.proj.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in original if (m := _BLOCK.fullmatch(k)))
    experts = sorted({int(m.group(1)) for k in original if (m := re.fullmatch(r"backbone\.blocks\.0\.mlp\.experts\.(\d+)\.weight", k))})
    if not experts:
        raise ConvertError("no `backbone.blocks.0.mlp.experts.*`: a dense ViTPose, not a ViTPose++ (MoE) checkpoint")
    if experts != list(range(len(experts))):
        raise ConvertError(f"experts {experts} in block 0 are not numbered 0..{len(experts) - 1}")
    intermediate = original["backbone.blocks.0.mlp.fc1.weight"].shape[0]
    part_features = original["backbone.blocks.0.mlp.experts.0.weight"].shape[0]
    if original["backbone.blocks.0.mlp.fc2.weight"].shape[0] + part_features != hidden:
        raise ConvertError(
            f"fc2 ({original['backbone.blocks.0.mlp.fc2.weight'].shape[0]} rows) + an expert ({part_features}) "
            f"!= the embedding size {hidden}"
        )
    if intermediate % hidden:
        raise ConvertError(f"MLP width {intermediate} is not a multiple of the embedding size {hidden}")
    heads = num_attention_heads or ATTENTION_HEADS.get(hidden)
    if heads is None:
        raise ConvertError(f"embedding size {hidden} is not a ViTPose++-S/B/L/H one: give the number of attention heads")
    if hidden % heads:
        raise ConvertError(f"embedding size {hidden} is not divisible by {heads} attention heads")
    height, width = image_size
    patches = (height // patch_h) * (width // patch_w)
    if original["backbone.pos_embed"].shape[1] != patches + 1:
        raise ConvertError(
            f"backbone.pos_embed has {original['backbone.pos_embed'].shape[1] - 1} positions, but a "
            f"{height}x{width} input makes {patches} patches: give the input size the model was trained at"
        )
    return {
        "image_size": [height, width], "patch_size": [patch_h, patch_w], "num_channels": channels,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "mlp_ratio": intermediate // hidden, "num_experts": len(experts), "part_features": part_features,
        "qkv_bias": "backbone.blocks.0.attn.qkv.bias" in original,
    }


def check_keys(original: dict[str, torch.Tensor], arch: dict) -> None:
    """Every key must be one a ViTPose++ checkpoint of this shape has; anything else is an error."""
    expected = set(_TOP_NAMES)
    block = [f"{m}.{k}" for m in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for k in ("weight", "bias")]
    block += ["attn.qkv.weight"] + (["attn.qkv.bias"] if arch["qkv_bias"] else [])
    block += [f"mlp.experts.{e}.{k}" for e in range(arch["num_experts"]) for k in ("weight", "bias")]
    expected |= {f"backbone.blocks.{i}.{name}" for i in range(arch["num_hidden_layers"]) for name in block}
    heads = ["keypoint_head."] + [f"associate_keypoint_heads.{j}." for j in range(len(DATASETS) - 1)]
    expected |= {prefix + name for prefix in heads for name in _HEAD_NAMES}
    unknown = sorted(set(original) - expected - IGNORED_KEYS)
    if unknown:
        raise ConvertError(
            f"{len(unknown)} unexpected key(s) for a ViTPose++ checkpoint: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}"
        )
    missing = sorted(k for k in expected if k.startswith("backbone.") and k not in original)
    if missing:
        raise ConvertError(
            f"{len(missing)} backbone key(s) missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )


def dense_expert(original: dict[str, torch.Tensor], dataset: str, num_attention_heads: int | None = None,
                 image_size: tuple[int, int] = (256, 192)):
    """Fold `dataset`'s expert and attach its head: a dense VitPoseForPoseEstimation (eval mode, float32)."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    if dataset not in EXPERT_INDEX:
        raise ConvertError(f"unknown dataset {dataset!r}; expected one of: {', '.join(DATASETS)}")
    arch = original_architecture(original, num_attention_heads, image_size)
    check_keys(original, arch)
    index = EXPERT_INDEX[dataset]
    if index >= arch["num_experts"]:
        raise ConvertError(f"dataset {dataset!r} is expert {index}, but the checkpoint has {arch['num_experts']} experts")
    schema = SCHEMAS[EXPERT_SCHEMA[dataset]]
    head = map_head(original, head_prefix(dataset))
    channels = head["head.conv.weight"].shape[0]
    if channels < schema.num_keypoints:
        raise ConvertError(
            f"{head_prefix(dataset)}final_layer has {channels} channels, {dataset} has {schema.num_keypoints} keypoints"
        )
    # model_split.py keeps the first num_keypoints channels of the final layer.
    head["head.conv.weight"] = head["head.conv.weight"][: schema.num_keypoints]
    head["head.conv.bias"] = head["head.conv.bias"][: schema.num_keypoints]
    state = {**fold_expert(map_backbone(original), index), **head}
    # Own copies: the q/k/v chunks share the qkv storage, which safetensors refuses to save.
    state = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}
    backbone = VitPoseBackboneConfig(
        **{k: v for k, v in arch.items() if k not in ("num_experts", "part_features")},
        num_experts=1, layer_norm_eps=LAYER_NORM_EPS, out_indices=[arch["num_hidden_layers"]],
    )
    config = VitPoseConfig(
        backbone_config=backbone,
        use_simple_decoder=False,
        num_labels=schema.num_keypoints,
        id2label=dict(enumerate(schema.keypoints)),
        label2id={name: i for i, name in enumerate(schema.keypoints)},
        raypose_schema=schema.name,
        raypose_source={"format": "vitpose-plus", "dataset": dataset, "expert_index": index,
                        "num_experts": arch["num_experts"], "part_features": arch["part_features"]},
    )
    return build_model(config, state)


def convert_vitpose_plus(checkpoint: str | Path, out: str | Path, datasets: list[str] | tuple[str, ...],
                         num_attention_heads: int | None = None, image_size: tuple[int, int] = (256, 192),
                         into_subfolders: bool = False) -> list[Path]:
    """Write one transformers checkpoint (safetensors + preprocessor_config.json) per dataset; return the folders."""
    from transformers.models.vitpose.image_processing_pil_vitpose import (
        VitPoseImageProcessorPil,
    )

    unknown = [d for d in datasets if d not in EXPERT_INDEX]
    if unknown:
        raise ConvertError(f"--dataset: unknown {unknown[0]!r}; expected one of: {', '.join(DATASETS)}")
    original = load_original(checkpoint)
    written = []
    for dataset in datasets:
        model = dense_expert(original, dataset, num_attention_heads, image_size)
        folder = Path(out) / dataset if into_subfolders else Path(out)
        model.save_pretrained(folder, safe_serialization=True)
        height, width = image_size
        VitPoseImageProcessorPil(size={"height": height, "width": width}).save_pretrained(folder)
        written.append(folder)
    return written


def fold_moe_model(model, index: int):
    """A loaded ViTPose++ (MoE) -> the dense model of expert `index`: same outputs, without the other experts' FLOPs.

    transformers' MoE MLP runs every expert on every token and masks the results; folded, the
    MLP is one Linear (`fold_expert`, as the original tools/model_split.py does).
    """
    import copy

    config = copy.deepcopy(model.config)
    if config.backbone_config.num_experts <= 1:
        return model
    if not 0 <= index < config.backbone_config.num_experts:
        raise ValueError(f"fold_expert: expert {index} is out of range ({config.backbone_config.num_experts} experts)")
    config.backbone_config.num_experts = 1
    return build_model(config, fold_expert(model.state_dict(), index))
