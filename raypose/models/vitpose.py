"""The ViTPose engine: a checkpoint's config read without weights, and the model loaded once to turn uint8 crops into keypoints."""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from raypose.errors import SpecError
from raypose.imaging.heatmaps import decode_heatmaps, flip_back
from raypose.models.hub import (
    check_weights,
    hub_revision,
    load_pretrained,
    local_fingerprint,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HeadSource(Enum):
    """How raypose knows which keypoint schema a checkpoint's head emits (the value says it in words)."""

    RECORDED = "recorded in its config (raypose_schema)"
    ASSUMED_PLUS = "assumed: ViTPose++ checkpoints in transformers format carry only the COCO head"
    ASSUMED_DENSE = "assumed: a 17-keypoint checkpoint whose config records no raypose_schema"
    SET = "set by the expert's head_schema"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ModelInfo:
    """What raypose needs to know about a checkpoint before loading its weights."""

    model_id: str
    revision: str
    input_size: tuple[int, int]  # (width, height) of the crops the model takes
    num_keypoints: int
    num_experts: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    head_schema: str | None = None  # the keypoint schema the head emits, where known or assumed
    head_schema_source: HeadSource = HeadSource.UNKNOWN  # how that is known


def inspect_model(model: str, revision: str | None = None, field: str = "pose.model") -> ModelInfo:
    """Read a checkpoint's config and its weights' header (no tensor) and check it is a ViTPose they fit."""
    from transformers import AutoConfig, VitPoseForPoseEstimation

    config = load_pretrained(AutoConfig.from_pretrained, model, revision, field)
    if getattr(config, "model_type", None) != "vitpose":
        raise SpecError(
            f"{field}: {model!r} is a {getattr(config, 'model_type', 'unknown')!r} model, "
            "expected a ViTPose checkpoint (model_type 'vitpose')"
        )
    check_weights(model, revision, field, config, VitPoseForPoseEstimation)
    backbone = config.backbone_config
    height, width = backbone.image_size
    mean, std = _normalization(model, revision, field)
    num_keypoints = int(config.num_labels)
    num_experts = int(getattr(backbone, "num_experts", 1))
    head_schema, head_source = _head_schema(config, num_keypoints, num_experts)
    return ModelInfo(
        model_id=model,
        revision=revision or getattr(config, "_commit_hash", None) or local_fingerprint(model),
        input_size=(int(width), int(height)),
        num_keypoints=num_keypoints,
        num_experts=num_experts,
        image_mean=mean,
        image_std=std,
        head_schema=head_schema,
        head_schema_source=head_source,
    )


def _head_schema(config, num_keypoints: int, num_experts: int) -> tuple[str | None, HeadSource]:
    """What the head's channels mean: recorded by `raypose convert`, else assumed from the channel count."""
    recorded = getattr(config, "raypose_schema", None)
    if recorded:
        return str(recorded), HeadSource.RECORDED
    if num_keypoints == 17 and num_experts > 1:
        return "coco17", HeadSource.ASSUMED_PLUS
    if num_keypoints == 17:
        return "coco17", HeadSource.ASSUMED_DENSE
    return None, HeadSource.UNKNOWN


def _normalization(model: str, revision: str | None, field: str) -> tuple[tuple, tuple]:
    from transformers.utils import cached_file

    path = load_pretrained(
        cached_file, model, revision, field, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
    )
    if not path:
        return IMAGENET_MEAN, IMAGENET_STD
    config = json.loads(Path(path).read_text())
    return tuple(config.get("image_mean", IMAGENET_MEAN)), tuple(config.get("image_std", IMAGENET_STD))


@dataclass(frozen=True)
class SubmittedBatch:
    """A forward queued on the device: its keypoints and scores land in host memory once `done` has passed."""

    keypoints: torch.Tensor
    scores: torch.Tensor
    done: torch.cuda.Event | None = None  # None: computed already (a CPU device)
    views: torch.Tensor | None = None  # (2, N, K, 2): the plain and the mirrored crops' keypoints, decoded apart


class PoseEngine:
    """A loaded ViTPose checkpoint: `estimate` maps uint8 crops and their geometry to keypoints."""

    def __init__(self, info: ModelInfo, device: str = "cpu", dtype: str = "float32", fold_expert: int | None = None,
                 decode: str = "transformers", compile: bool = False):
        """`device` (cpu, cuda, cuda:N) and `dtype` (float32, bfloat16, float16) as the job's layout resolved them."""
        from transformers import VitPoseForPoseEstimation

        from raypose.models.convert import fold_moe_model

        self.info = info
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.decode = decode
        self.folded = fold_expert  # the MoE expert folded into fc2 (then no dataset_index is passed), or None
        model = load_pretrained(
            VitPoseForPoseEstimation.from_pretrained, info.model_id, hub_revision(info.revision), "pose.model",
            use_safetensors=True, dtype=self.dtype,
        )
        if fold_expert is not None:
            model = fold_moe_model(model, fold_expert)
        self.model = channels_last_upsampling(model).to(self.device).eval()
        if compile:
            # Inductor fuses the elementwise ops between the matmuls (the gain: benchmarks/README.md).
            # Batch sizes vary at block ends, so shapes are left dynamic (one recompile, not one per size).
            self.model = torch.compile(self.model)
        # (x / 255 - mean) / std as one multiply-add.
        std = torch.tensor(info.image_std, device=self.device).view(1, 3, 1, 1)
        mean = torch.tensor(info.image_mean, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def estimate(
        self,
        crops: np.ndarray | torch.Tensor,
        centers: np.ndarray,
        scales: np.ndarray,
        dataset_index: int | None = None,
        flip_pairs: tuple[tuple[int, int], ...] | None = None,
        average_flip: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`submit` and `collect` in one: keypoints (N, K, 2) in image px and scores (N, K)."""
        return self.collect(self.submit(crops, centers, scales, dataset_index, flip_pairs, average_flip))

    @torch.inference_mode()
    def submit(
        self,
        crops: np.ndarray | torch.Tensor,
        centers: np.ndarray,
        scales: np.ndarray,
        dataset_index: int | None = None,
        flip_pairs: tuple[tuple[int, int], ...] | None = None,
        average_flip: bool = True,
        flip_views: bool = False,
    ) -> SubmittedBatch:
        """Crops (N, H, W, 3) + centers/scales (N, 2) -> keypoints in image px and scores, queued on the device.

        The crops (0-255, uint8 or float; never written to) may already be on the device
        (`crop_torch`). `flip_pairs` runs the mirrored crops in the same forward pass: their
        heatmaps, flipped back, are averaged with the plain ones (the flip test) unless
        `average_flip` is false (then the keypoints are the plain crops' own). `flip_views` also
        decodes the plain and the flipped-back heatmaps apart (`views`, for the flip uncertainty):
        two more decodes, no more forwards. On a GPU nothing here waits for the device (host
        memory goes over pinned, the answers come back into pinned memory behind an event), so
        the caller prepares the next batch, or another thread submits its own, while this one runs.
        """
        if isinstance(crops, torch.Tensor):
            pixels = crops
        else:
            with warnings.catch_warnings():
                # A read-only view of the crop column (`arrow_views.crop_array`): nothing below writes to it.
                warnings.simplefilter("ignore", UserWarning)
                pixels = torch.from_numpy(crops)
        pixels = self._to_device(pixels)
        geometry = self._to_device(torch.from_numpy(np.stack([centers, scales]).astype(np.float32, copy=False)))
        pixels = pixels.permute(0, 3, 1, 2).to(torch.float32, copy=True)
        # In place on that copy: the same values with one float copy of the batch, not three.
        pixels = pixels.mul_(self._scale).add_(self._shift).to(self.dtype)
        n = pixels.shape[0]
        if flip_pairs is not None:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        heatmaps = self._heatmaps(pixels, dataset_index)
        views = None
        if flip_pairs is not None:
            plain, mirrored = heatmaps[:n], flip_back(heatmaps[n:], self._pairs(flip_pairs))
            if flip_views:
                views, _ = decode_heatmaps(torch.cat([plain, mirrored]), geometry[0].repeat(2, 1),
                                           geometry[1].repeat(2, 1), decode=self.decode)
                views = views.unflatten(0, (2, n))
            heatmaps = 0.5 * (plain + mirrored) if average_flip else plain
        elif flip_views:
            raise ValueError("flip_views: the flip uncertainty needs the mirrored crops (flip_pairs)")
        keypoints, scores = decode_heatmaps(heatmaps, geometry[0], geometry[1], decode=self.decode)
        if self.device.type != "cuda":
            return SubmittedBatch(keypoints, scores, views=views)
        keypoints, scores = keypoints.to("cpu", non_blocking=True), scores.to("cpu", non_blocking=True)
        views = views.to("cpu", non_blocking=True) if views is not None else None
        done = torch.cuda.Event()
        done.record()
        return SubmittedBatch(keypoints, scores, done, views)

    @staticmethod
    def collect(submitted: SubmittedBatch) -> tuple[np.ndarray, np.ndarray]:
        """A submitted batch's keypoints and scores on the host: waits for its forward, not for later ones."""
        if submitted.done is not None:
            submitted.done.synchronize()
        return submitted.keypoints.numpy(), submitted.scores.numpy()

    @staticmethod
    def collect_views(submitted: SubmittedBatch) -> np.ndarray | None:
        """The plain and the mirrored crops' keypoints (2, N, K, 2) in image px, where `flip_views` asked for them."""
        if submitted.views is None:
            return None
        if submitted.done is not None:
            submitted.done.synchronize()
        return submitted.views.numpy()

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            # A pageable copy would wait for the forwards already queued; a pinned one is queued behind them.
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    @functools.lru_cache(maxsize=8)  # noqa: B019 (one engine per checkpoint, held for the actor's life)
    def _pairs(self, flip_pairs: tuple[tuple[int, int], ...]) -> torch.Tensor:
        return torch.tensor(flip_pairs, dtype=torch.long).reshape(-1, 2).to(self.device)

    def _heatmaps(self, pixels: torch.Tensor, dataset_index: int | None) -> torch.Tensor:
        if self.folded is not None:
            if dataset_index not in (None, self.folded):
                raise ValueError(f"dataset_index {dataset_index}: this model has expert {self.folded} folded in")
            dataset_index = None
        kwargs = {}
        if dataset_index is not None:
            kwargs["dataset_index"] = torch.full(
                (pixels.shape[0],), dataset_index, dtype=torch.long, device=self.device
            )
        return self.model(pixel_values=pixels, **kwargs).heatmaps.float()


class ChannelsLastUpsample(torch.nn.Module):
    """A bilinear `nn.Upsample` computed on channels-last memory: the same values, much faster.

    PyTorch's NCHW bilinear kernel took most of a ViTPose-B forward on an H100 in bf16, and is
    slower on CPU too (benchmarks/README.md); the channels-last kernel gives bit-identical
    output, and the 3x3 conv after it runs on NHWC.
    """

    def __init__(self, upsample: torch.nn.Upsample):
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = upsample.scale_factor, upsample.mode, upsample.align_corners

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.interpolate(
            hidden, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners
        )


def channels_last_upsampling(model):
    """Swap the simple decoder's upsampling for `ChannelsLastUpsample` (other heads are left as they are)."""
    head = getattr(model, "head", None)
    if isinstance(getattr(head, "upsampling", None), torch.nn.Upsample) and head.upsampling.mode == "bilinear":
        head.upsampling = ChannelsLastUpsample(head.upsampling)
    return model
