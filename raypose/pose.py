"""The pose engine: a ViTPose checkpoint loaded once, uint8 crops in, keypoints out."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import torch

from raypose.errors import SpecError
from raypose.heatmaps import decode_heatmaps, flip_back
from raypose.keypoint_schemas import EXPERT_INDEX, EXPERT_SCHEMA, SCHEMAS, KeypointSchema
from raypose.spec import PoseSpec
from raypose.table import POSE_OUTPUT_SCHEMA

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KEYPOINT_SCORE_FLOOR = 0.2
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # mmpose's rescoring: keypoints above this count toward the instance score


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


def inspect_model(pose: PoseSpec) -> ModelInfo:
    """Read the checkpoint's config (no weights) and check it is a ViTPose the job can use."""
    from transformers import AutoConfig

    config = _load_pretrained(AutoConfig.from_pretrained, pose)
    if getattr(config, "model_type", None) != "vitpose":
        raise SpecError(
            f"pose.model: {pose.model!r} is a {getattr(config, 'model_type', 'unknown')!r} model, "
            "expected a ViTPose checkpoint (model_type 'vitpose')"
        )
    backbone = config.backbone_config
    height, width = backbone.image_size
    num_experts = int(getattr(backbone, "num_experts", 1))
    schema_name = EXPERT_SCHEMA.get(pose.expert)
    if schema_name is None:
        raise SpecError(
            f"pose.expert: no keypoint schema for expert {pose.expert!r} in this version "
            f"(available: {', '.join(EXPERT_SCHEMA)})"
        )
    schema = SCHEMAS[schema_name]
    if config.num_labels != schema.num_keypoints:
        raise SpecError(
            f"pose.expert: {pose.expert!r} means {schema.num_keypoints} keypoints ({schema.name}), "
            f"but {pose.model!r} outputs {config.num_labels} heatmaps"
        )
    mean, std = _normalization(pose)
    return ModelInfo(
        model_id=pose.model,
        revision=pose.revision or getattr(config, "_commit_hash", None) or _local_fingerprint(pose.model),
        input_size=(int(width), int(height)),
        num_keypoints=int(config.num_labels),
        num_experts=num_experts,
        image_mean=mean,
        image_std=std,
    )


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when this process sees a GPU, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on a GPU that has it (float16 otherwise), float32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


class PoseEngine:
    """A loaded ViTPose model: `estimate` maps uint8 crops and their geometry to keypoints."""

    def __init__(self, pose: PoseSpec, num_threads: int | None = None):
        from transformers import VitPoseForPoseEstimation

        if num_threads:
            torch.set_num_threads(num_threads)
        self.info = inspect_model(pose)
        self.device = resolve_device(pose.device)
        self.dtype = resolve_dtype(pose.dtype, self.device)
        self.expert = pose.expert
        self.schema: KeypointSchema = SCHEMAS[EXPERT_SCHEMA[pose.expert]]
        self.flip_test = pose.flip_test
        model = _load_pretrained(
            VitPoseForPoseEstimation.from_pretrained, pose, use_safetensors=True, dtype=self.dtype
        )
        self.model = model.to(self.device).eval()
        self.dataset_index = EXPERT_INDEX[pose.expert] if self.info.num_experts > 1 else None
        # (x / 255 - mean) / std as one multiply-add.
        std = torch.tensor(self.info.image_std, device=self.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.info.image_mean, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self._flip_pairs = torch.tensor(self.schema.flip_pairs, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def estimate(
        self, crops: np.ndarray, centers: np.ndarray, scales: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Crops (N, H, W, 3) uint8 + centers/scales (N, 2) -> keypoints (N, K, 2) image px, scores (N, K)."""
        pixels = torch.from_numpy(crops)
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        pixels = (pixels * self._scale + self._shift).to(self.dtype)
        heatmaps = self._heatmaps(pixels)
        if self.flip_test:
            heatmaps = 0.5 * (heatmaps + flip_back(self._heatmaps(pixels.flip(-1)), self._flip_pairs))
        keypoints, scores = decode_heatmaps(heatmaps, torch.from_numpy(centers), torch.from_numpy(scales))
        return keypoints.cpu().numpy(), scores.cpu().numpy()

    def _heatmaps(self, pixels: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.dataset_index is not None:
            kwargs["dataset_index"] = torch.full(
                (pixels.shape[0],), self.dataset_index, dtype=torch.long, device=self.device
            )
        return self.model(pixel_values=pixels, **kwargs).heatmaps.float()


class PoseStage:
    """Ray actor for the pose stage: crop rows in, keypoint rows out (failures pass through)."""

    def __init__(self, pose: PoseSpec, num_threads: int | None = None):
        self.engine = PoseEngine(pose, num_threads=num_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return estimate_rows(self.engine, batch)


def estimate_rows(engine: PoseEngine, batch: pa.Table) -> pa.Table:
    """Run the engine over the rows that have a crop; rows that failed earlier pass through."""
    n = batch.num_rows
    crop_column = batch.column("crop").combine_chunks()
    ok = np.asarray(crop_column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    stage = batch.column("error_stage").to_pylist()
    reason = batch.column("error_reason").to_pylist()
    k = engine.schema.num_keypoints
    xs = np.full((n, k), np.nan, np.float32)
    ys, ss = xs.copy(), xs.copy()
    if ok.any():
        width, height = engine.info.input_size
        crops = _crop_array(crop_column, height, width)[ok]
        centers = _pairs(batch.column("center"))[ok]
        scales = _pairs(batch.column("scale"))[ok]
        try:
            keypoints, scores = engine.estimate(crops, centers, scales)
            xs[ok], ys[ok], ss[ok] = keypoints[..., 0], keypoints[..., 1], scores
        except Exception as exc:  # a failed batch becomes error rows, the job goes on
            log.exception("pose batch of %d crops failed", int(ok.sum()))
            for i in np.flatnonzero(ok):
                stage[i], reason[i] = "pose", f"{type(exc).__name__}: {exc}"
            ok = np.zeros(n, dtype=bool)
    instance_score = _instance_scores(ss, batch.column("box_score").to_numpy(zero_copy_only=False))
    pose_columns = {
        "expert": pa.array(np.where(ok, engine.expert, None).tolist(), pa.string()),
        "keypoint_schema": pa.array(np.where(ok, engine.schema.name, None).tolist(), pa.string()),
        "keypoint_x": _lists(xs, ok),
        "keypoint_y": _lists(ys, ok),
        "keypoint_score": _lists(ss, ok),
        "instance_score": pa.array(instance_score, pa.float32(), mask=~ok),
        "error_stage": pa.array(stage, pa.string()),
        "error_reason": pa.array(reason, pa.string()),
    }
    columns = {name: pose_columns.get(name, batch.column(name) if name in batch.column_names else None)
               for name in POSE_OUTPUT_SCHEMA.names}
    return pa.table(columns, schema=POSE_OUTPUT_SCHEMA)


def _instance_scores(scores: np.ndarray, box_scores: np.ndarray) -> np.ndarray:
    """mmpose's top-down rescoring: mean of keypoint scores above 0.2, times the box score (1 for GT)."""
    confident = scores > KEYPOINT_SCORE_FLOOR
    count = confident.sum(axis=1)
    mean = np.where(count > 0, np.where(confident, scores, 0).sum(axis=1) / np.maximum(count, 1), 0.0)
    box = np.where(np.isnan(box_scores.astype(np.float64)), 1.0, box_scores)
    return (mean * box).astype(np.float32)


def _crop_array(column: pa.FixedSizeBinaryArray, height: int, width: int) -> np.ndarray:
    size = height * width * 3
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    start = column.offset * size
    return data[start : start + len(column) * size].reshape(len(column), height, width, 3)


def _pairs(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<float32, 2> column as (N, 2); null rows read as NaN."""
    pairs = column.combine_chunks()
    values = pairs.values.slice(pairs.offset * 2, len(pairs) * 2)  # .values ignores the offset
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 2)


def _lists(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    n, k = values.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)), mask=pa.array(~ok))


def _normalization(pose: PoseSpec) -> tuple[tuple, tuple]:
    from transformers.utils import cached_file

    path = _load_pretrained(
        cached_file, pose, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
    )
    if not path:
        return IMAGENET_MEAN, IMAGENET_STD
    config = json.loads(Path(path).read_text())
    return tuple(config.get("image_mean", IMAGENET_MEAN)), tuple(config.get("image_std", IMAGENET_STD))


def _load_pretrained(load, pose: PoseSpec, *args, **kwargs):
    """Call a transformers loader; a checkpoint that cannot be fetched fails fast with a fix."""
    ref = pose.model
    local = Path(ref).expanduser()
    if local.is_dir():
        ref = str(local)
    elif not HUB_ID.fullmatch(ref) or local.exists():
        raise SpecError(f"pose.model: {ref} is not a directory (nor a hub id like 'owner/name')")
    else:
        try:
            return load(ref, *args, revision=pose.revision, local_files_only=True, **kwargs)
        except OSError:
            pass  # not in the local cache: go to the hub
        if not _hub_reachable():
            raise SpecError(
                f"pose.model: cannot fetch {ref!r}: the Hugging Face hub is not reachable from here "
                "and the checkpoint is not in the local cache. Download it where there is network "
                f"(`hf download {ref} --local-dir DIR`), copy DIR here and set pose.model: DIR"
            )
    try:
        return load(ref, *args, revision=pose.revision, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"pose.model: cannot load {ref!r}: {first}") from exc


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _local_fingerprint(model: str) -> str:
    """For a local checkpoint: sha256 over its config and weight files, so reruns can tell models apart."""
    digest = hashlib.sha256()
    root = Path(model)
    for path in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]
