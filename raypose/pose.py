"""The pose engine: a ViTPose checkpoint loaded once, uint8 crops in, keypoints out."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import torch

from raypose.crops import make_crops, plan_crops
from raypose.device_crops import CropCutter, cut_crops
from raypose.errors import SpecError
from raypose.faults import inject
from raypose.heatmaps import decode_heatmaps, flip_back
from raypose.keypoint_schemas import SCHEMAS
from raypose.table import POSE_OUTPUT_SCHEMA

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KEYPOINT_SCORE_FLOOR = 0.2  # mmpose's rescoring: keypoints above this count toward the instance score
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


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
    head_schema_source: str = "unknown"  # how that is known: recorded in the config, or why it is assumed


def inspect_model(model: str, revision: str | None = None, field: str = "pose.model") -> ModelInfo:
    """Read a checkpoint's config (no weights) and check it is a ViTPose."""
    from transformers import AutoConfig

    config = _load_pretrained(AutoConfig.from_pretrained, model, revision, field)
    if getattr(config, "model_type", None) != "vitpose":
        raise SpecError(
            f"{field}: {model!r} is a {getattr(config, 'model_type', 'unknown')!r} model, "
            "expected a ViTPose checkpoint (model_type 'vitpose')"
        )
    backbone = config.backbone_config
    height, width = backbone.image_size
    mean, std = _normalization(model, revision, field)
    num_keypoints = int(config.num_labels)
    num_experts = int(getattr(backbone, "num_experts", 1))
    head_schema, head_source = _head_schema(config, num_keypoints, num_experts)
    return ModelInfo(
        model_id=model,
        revision=revision or getattr(config, "_commit_hash", None) or _local_fingerprint(model),
        input_size=(int(width), int(height)),
        num_keypoints=num_keypoints,
        num_experts=num_experts,
        image_mean=mean,
        image_std=std,
        head_schema=head_schema,
        head_schema_source=head_source,
    )


def _head_schema(config, num_keypoints: int, num_experts: int) -> tuple[str | None, str]:
    """What the head's channels mean: recorded by `raypose convert`, else assumed from the channel count."""
    recorded = getattr(config, "raypose_schema", None)
    if recorded:
        return str(recorded), "recorded in its config (raypose_schema)"
    if num_keypoints == 17 and num_experts > 1:
        return "coco17", "assumed: ViTPose++ checkpoints in transformers format carry only the COCO head"
    if num_keypoints == 17:
        return "coco17", "assumed: a 17-keypoint checkpoint whose config records no raypose_schema"
    return None, "unknown"


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when this process sees a GPU, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# On CPU a small batch keeps a forward's activations in cache: ViTPose-S float32 on 2 cores,
# 51.6 ms per crop at 8 vs 59.4 at 32 (bfloat16 18.0 vs 22.3), and in the pipeline 128 images
# ran at 16.1-16.2 vs 14.6-15.6 crops/s once the actor was up (benchmarks/README.md).
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 256


def default_batch_size(on_gpu: bool) -> int:
    """pose.batch_size when the spec leaves it out: what measured fastest (benchmarks/README.md)."""
    return GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on a GPU that has it (float16 otherwise), float32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


class PoseEngine:
    """A loaded ViTPose checkpoint: `estimate` maps uint8 crops and their geometry to keypoints."""

    def __init__(self, info: ModelInfo, device: str = "auto", dtype: str = "auto", fold_expert: int | None = None,
                 decode: str = "transformers", compile: bool = False):
        from transformers import VitPoseForPoseEstimation

        self.info = info
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.decode = decode
        self.folded = fold_expert  # the MoE expert folded into fc2 (then no dataset_index is passed), or None
        model = _load_pretrained(
            VitPoseForPoseEstimation.from_pretrained, info.model_id, _hub_revision(info), "pose.model",
            use_safetensors=True, dtype=self.dtype,
        )
        if fold_expert is not None:
            model = fold_moe_model(model, fold_expert)
        self.model = channels_last_upsampling(model).to(self.device).eval()
        if compile:
            # Inductor fuses the elementwise ops between the matmuls: ViTPose-B bf16 on an H100,
            # 7,940 -> 10,226 crops/s at batch 256 (benchmarks/README.md). Batch sizes vary at
            # block ends, so shapes are left dynamic (one recompile, not one per size).
            self.model = torch.compile(self.model)
        # (x / 255 - mean) / std as one multiply-add.
        std = torch.tensor(info.image_std, device=self.device).view(1, 3, 1, 1)
        mean = torch.tensor(info.image_mean, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    @torch.inference_mode()
    def estimate(
        self,
        crops: np.ndarray | torch.Tensor,
        centers: np.ndarray,
        scales: np.ndarray,
        dataset_index: int | None = None,
        flip_pairs: tuple[tuple[int, int], ...] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Crops (N, H, W, 3) uint8 + centers/scales (N, 2) -> keypoints (N, K, 2) image px, scores (N, K).

        The crops (0-255, uint8 or float; never written to) may already be on the device
        (`device_crops`). `flip_pairs` turns on the flip test: the mirrored crops run in the
        same forward pass.
        """
        if isinstance(crops, torch.Tensor):
            pixels = crops
        else:
            with warnings.catch_warnings():
                # A read-only view of the crop column (`_crop_array`): nothing below writes to it.
                warnings.simplefilter("ignore", UserWarning)
                pixels = torch.from_numpy(crops)
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32, copy=True)
        # In place on that copy: the same values with one float copy of the batch, not three
        # (0.81 -> 0.36 ms per crop on one CPU thread).
        pixels = pixels.mul_(self._scale).add_(self._shift).to(self.dtype)
        n = pixels.shape[0]
        if flip_pairs is not None:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        heatmaps = self._heatmaps(pixels, dataset_index)
        if flip_pairs is not None:
            pairs = torch.tensor(flip_pairs, dtype=torch.long, device=self.device).reshape(-1, 2)
            heatmaps = 0.5 * (heatmaps[:n] + flip_back(heatmaps[n:], pairs))
        keypoints, scores = decode_heatmaps(
            heatmaps, torch.from_numpy(centers), torch.from_numpy(scales), decode=self.decode
        )
        return keypoints.cpu().numpy(), scores.cpu().numpy()

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


class PoseStage:
    """Ray actor for the pose stage: every checkpoint the routing uses, loaded once."""

    def __init__(self, routing, device: str = "auto", dtype: str = "auto", flip_test: bool = False,
                 num_threads: int | None = None, compile: bool = False, batch_size: int | None = None,
                 crop_in: str = "tasks", crop_options: dict | None = None):
        """`crop_in` pose_actor or pose_device: the actor takes image rows and makes their crops itself
        (`crops.make_crops`, or `crops.plan_crops` + `device_crops.cut_crops` on its device, with
        `crop_options`), then runs the forwards `batch_size` crops at a time."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.routing = routing
        self.flip_test = flip_test
        self.batch_size = batch_size
        self.crop_in = crop_in
        self.crop_options = crop_options or {}
        self.device = resolve_device(device)
        self._forwards = threading.Lock()
        self.engines: dict[tuple[str, str], PoseEngine] = {}
        for expert in routing.experts.values():
            key = (expert.model.model_id, expert.model.revision)
            if key not in self.engines:
                # resolve_routing lets a folded checkpoint serve one dataset_index only.
                self.engines[key] = PoseEngine(
                    expert.model, device=device, dtype=dtype,
                    fold_expert=expert.dataset_index if expert.folded else None, decode=routing.decode,
                    compile=compile,
                )

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch, pixels = self.crop(batch)
        inject("pose")
        # With resources.pose_calls_per_actor > 1 calls run in threads: their crops overlap,
        # their forwards take turns (two at once would only fight over the cores or the GPU).
        with self._forwards:
            return estimate_rows(self.engines, self.routing, batch, flip_test=self.flip_test,
                                 batch_size=self.batch_size, pixels=pixels)

    def crop(self, batch: pa.Table) -> tuple[pa.Table, CropCutter | None]:
        """Image rows -> crop rows, where this actor makes the crops (with the device's cutter); crop rows pass."""
        if self.crop_in == "pose_actor":
            return make_crops(batch, **self.crop_options, threads=torch.get_num_threads()), None
        if self.crop_in == "pose_device":
            batch, images = plan_crops(batch, **self.crop_options)
            try:
                return cut_crops(batch, images, self.device, self.crop_options["max_pixels"])
            except Exception as exc:  # e.g. out of GPU memory: this call's crops fail as rows, the job goes on
                log.exception("cutting %d images' crops on %s failed", len(images), self.device)
                return _failed_crops(batch, "crop", f"{type(exc).__name__}: {exc}"), None
        return batch, None


def cpu_pose_actors(node_cpus: int) -> int:
    """Pose actors on CPU when the job leaves it out (and they make their own crops): two, so that
    one crops while the other runs forwards, each forward on half the cores.

    2-core box, ViTPose-S float32: the forward alone in two single-threaded processes 20.35-20.53
    crops/s, in one with two threads 18.99-19.17; 128-image jobs 16.71 / 16.19 vs 15.77 / 16.00
    crops/s (benchmarks/README.md).
    """
    return min(2, max(1, node_cpus))


def cpu_pose_threads(node_cpus: int, actors: int) -> int:
    """Torch threads for a CPU pose actor: its node's CPUs shared among the pose actors.

    The forward pass is almost all of a CPU job's work (the crop stage took 20 of ~270 CPU-ms
    per crop in benchmarks/README.md's CPU run), so the actor takes the cores its reservation
    leaves idle; Ray's CPU count only paces the crop tasks.
    """
    return max(1, node_cpus // max(1, actors))


def estimate_rows(
    engines: dict, routing, batch: pa.Table, flip_test: bool = False, batch_size: int | None = None,
    pixels: CropCutter | None = None,
) -> pa.Table:
    """Run each expert on its own rows (homogeneous forward batches of at most `batch_size`); failed rows pass through.

    The crops come from the `crop` column, or from `pixels(rows, input_size)` when given.
    """
    n = batch.num_rows
    experts = batch.column("expert").to_pylist()
    stage = batch.column("error_stage").to_pylist()
    reason = batch.column("error_reason").to_pylist()
    if pixels is None:
        crops = batch.column("crop")
        # combine_chunks copies even a single chunk (38 MB for 256 crops).
        crops = crops.chunk(0) if crops.num_chunks == 1 else crops.combine_chunks()
        pixels = functools.partial(_crop_array, crops)
    centers = _pairs(batch.column("center"))
    scales = _pairs(batch.column("scale"))
    forwards = []
    for name in sorted({e for e, s in zip(experts, stage) if s is None}):
        rows = [i for i in range(n) if experts[i] == name and stage[i] is None]
        step = batch_size or len(rows)
        forwards += [(name, rows[start : start + step]) for start in range(0, len(rows), step)]
    done = []  # (rows, keypoints, scores, keypoint schema) of each forward that ran
    for name, rows in forwards:
        expert = routing.experts[name]
        engine = engines[(expert.model.model_id, expert.model.revision)]
        schema = SCHEMAS[expert.keypoint_schema]
        try:
            inject("model")
            keypoints, scores = engine.estimate(
                pixels(rows, expert.input_size), centers[rows], scales[rows],
                dataset_index=expert.dataset_index, flip_pairs=schema.flip_pairs if flip_test else None,
            )
        except Exception as exc:  # a failed batch becomes error rows, the job goes on
            log.exception("pose batch of %d crops for expert %s failed", len(rows), name)
            for i in rows:
                stage[i], reason[i] = "pose", f"{type(exc).__name__}: {exc}"
            continue
        done.append((rows, keypoints, scores, expert.keypoint_schema))
    box_scores = batch.column("box_score").to_numpy(zero_copy_only=False)
    pose_columns = {
        **_keypoint_columns(experts, done, box_scores),
        "error_stage": pa.array(stage, pa.string()),
        "error_reason": pa.array(reason, pa.string()),
    }
    columns = {name: pose_columns[name] if name in pose_columns else batch.column(name)
               for name in POSE_OUTPUT_SCHEMA.names}
    return pa.table(columns, schema=POSE_OUTPUT_SCHEMA)


class ChannelsLastUpsample(torch.nn.Module):
    """A bilinear `nn.Upsample` computed on channels-last memory: the same values, much faster.

    PyTorch's NCHW bilinear kernel took 73% of a ViTPose-B forward on an H100 in bf16 (75 of
    102 ms per 256 crops, benchmarks/profile_pose.py) and is ~3x slower on CPU too; the
    channels-last kernel gives bit-identical output, and the 3x3 conv after it runs on NHWC.
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


def fold_moe_model(model, index: int):
    """A loaded ViTPose++ (MoE) -> the dense model of expert `index`: same outputs, without the other experts' FLOPs.

    transformers' MoE MLP runs every expert on every token and masks the results; folded, the
    MLP is one Linear (`raypose.convert.fold_expert`, as the original tools/model_split.py does).
    """
    import copy

    from raypose.convert import build_model, fold_expert

    config = copy.deepcopy(model.config)
    if config.backbone_config.num_experts <= 1:
        return model
    if not 0 <= index < config.backbone_config.num_experts:
        raise ValueError(f"fold_expert: expert {index} is out of range ({config.backbone_config.num_experts} experts)")
    config.backbone_config.num_experts = 1
    return build_model(config, fold_expert(model.state_dict(), index))


def _failed_crops(batch: pa.Table, stage: str, reason: str) -> pa.Table:
    """The batch with every crop row (a row with an expert and no error yet) failed at `stage`."""
    failing = [e is not None and s is None for e, s in zip(batch.column("expert").to_pylist(),
                                                          batch.column("error_stage").to_pylist())]
    stages = [stage if f else s for f, s in zip(failing, batch.column("error_stage").to_pylist())]
    reasons = [reason if f else r for f, r in zip(failing, batch.column("error_reason").to_pylist())]
    batch = batch.set_column(batch.schema.get_field_index("error_stage"), "error_stage", pa.array(stages, pa.string()))
    return batch.set_column(batch.schema.get_field_index("error_reason"), "error_reason", pa.array(reasons, pa.string()))


def instance_scores(scores: np.ndarray, box_scores: np.ndarray) -> np.ndarray:
    """mmpose's top-down rescoring of instances (N, K) -> (N,): mean of keypoint scores above 0.2
    (0 if none), times the box score (1 for a box without one, e.g. ground truth)."""
    confident = scores > KEYPOINT_SCORE_FLOOR
    means = np.where(confident, scores, 0).sum(axis=1) / np.maximum(confident.sum(axis=1), 1)
    return (means * np.where(np.isnan(box_scores), 1.0, box_scores)).astype(np.float32)


def _keypoint_columns(experts: list, done: list, box_scores: np.ndarray) -> dict[str, pa.Array]:
    """The expert, keypoint and instance-score columns from each forward's (rows, keypoints, scores,
    schema), written forward by forward (no per-row Python); null where no forward ran."""
    n = len(experts)
    lengths = np.zeros(n, np.int32)
    schemas = np.full(n, None, dtype=object)
    for rows, keypoints, _, schema in done:
        lengths[rows], schemas[rows] = keypoints.shape[1], schema
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    xs, ys, ss = (np.empty(offsets[-1], np.float32) for _ in range(3))
    instance = np.zeros(n, np.float32)
    for rows, keypoints, scores, _ in done:
        at = offsets[rows][:, None] + np.arange(keypoints.shape[1])
        xs[at], ys[at], ss[at] = keypoints[..., 0], keypoints[..., 1], scores
        instance[rows] = instance_scores(scores, box_scores[rows])
    missing = lengths == 0
    lists = {name: pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=pa.array(missing))
             for name, values in (("keypoint_x", xs), ("keypoint_y", ys), ("keypoint_score", ss))}
    return {
        "expert": pa.array(np.where(missing, None, np.array(experts, dtype=object)), pa.string()),
        "keypoint_schema": pa.array(schemas, pa.string()),
        **lists,
        "instance_score": pa.array(instance, pa.float32(), mask=missing),
    }


def _crop_array(column: pa.BinaryArray, rows: list[int], input_size: tuple[int, int]) -> np.ndarray:
    """The crops of some rows of a binary column as one (N, H, W, 3) uint8 array.

    Consecutive rows (one expert's forward batch, no failed row among them) are a read-only
    view of the column's buffer: a 256-crop batch is 38 MB, and copying it took 10.5 of the
    63.9 ms the H200 machine's host spent on such a batch (benchmarks/profile_pose.py).
    """
    width, height = input_size
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset :]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
    first, n = (rows[0] if rows else 0), len(rows)
    span = offsets[first : first + n + 1]
    if n and rows == list(range(first, first + n)) and np.all(np.diff(span) == width * height * 3):
        return data[span[0] : span[-1]].reshape(n, height, width, 3)
    out = np.empty((len(rows), height, width, 3), dtype=np.uint8)
    for j, i in enumerate(rows):
        out[j] = data[offsets[i] : offsets[i + 1]].reshape(height, width, 3)
    return out


def _pairs(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<float32, 2> column as (N, 2); null rows read as NaN."""
    pairs = column.combine_chunks()
    values = pairs.values.slice(pairs.offset * 2, len(pairs) * 2)  # .values ignores the offset
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 2)


def _normalization(model: str, revision: str | None, field: str) -> tuple[tuple, tuple]:
    from transformers.utils import cached_file

    path = _load_pretrained(
        cached_file, model, revision, field, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
    )
    if not path:
        return IMAGENET_MEAN, IMAGENET_STD
    config = json.loads(Path(path).read_text())
    return tuple(config.get("image_mean", IMAGENET_MEAN)), tuple(config.get("image_std", IMAGENET_STD))


def _load_pretrained(load, model: str, revision: str | None, field: str, *args, **kwargs):
    """Call a transformers loader; a checkpoint that cannot be fetched fails fast with a fix."""
    ref = model
    local = Path(ref).expanduser()
    if local.is_dir():
        ref = str(local)
    elif not HUB_ID.fullmatch(ref) or local.exists():
        raise SpecError(f"{field}: {ref} is not a directory (nor a hub id like 'owner/name')")
    else:
        try:
            return load(ref, *args, revision=revision, local_files_only=True, **kwargs)
        except OSError:
            pass  # not in the local cache: go to the hub
        if not _hub_reachable():
            raise SpecError(
                f"{field}: cannot fetch {ref!r}: the Hugging Face hub is not reachable from here "
                "and the checkpoint is not in the local cache. Download it where there is network "
                f"(`hf download {ref} --local-dir DIR`), copy DIR here and set {field}: DIR"
            )
    try:
        return load(ref, *args, revision=revision, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{field}: cannot load {ref!r}: {first}") from exc


def _hub_revision(info: ModelInfo) -> str | None:
    # A local checkpoint's revision is raypose's fingerprint, not something the hub knows.
    return None if info.revision.startswith("sha256:") else info.revision


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
