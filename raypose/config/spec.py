"""The job spec: YAML -> a validated, frozen JobSpec with defaults filled in.

Every error names the field (`pose.batch_size: expected a positive integer, got "abc"`),
so a scheduled job's log says what to fix without reading code.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from raypose.config.job_yaml import load_bounded_yaml, read_job_text
from raypose.config.paths import resolve_paths
from raypose.errors import SpecError
from raypose.imaging.keypoint_schemas import EXPERT_SCHEMA

SECRET_KEY_PATTERN = re.compile(r"(secret|token|password|passwd|credential|key)", re.IGNORECASE)


def _expect(check, expected: str):
    """A strict before-validator whose message says what was expected."""

    def validate(value: Any) -> Any:
        if not check(value):
            raise PydanticCustomError("raypose_expected", expected)
        return value

    return BeforeValidator(validate)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


PositiveInt = Annotated[int, _expect(lambda v: _is_int(v) and v > 0, "expected a positive integer")]
NonNegativeFloat = Annotated[
    float, _expect(lambda v: _is_number(v) and v >= 0, "expected a number >= 0")
]
PositiveFloat = Annotated[float, _expect(lambda v: _is_number(v) and v > 0, "expected a number > 0")]
Fraction = Annotated[
    float, _expect(lambda v: _is_number(v) and 0 <= v <= 1, "expected a number between 0 and 1")
]
Flag = Annotated[bool, _expect(lambda v: isinstance(v, bool), "expected true or false")]
Text = Annotated[str, _expect(lambda v: isinstance(v, str) and v != "", "expected a non-empty string")]
Options = Annotated[
    dict[str, Any],
    _expect(lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "expected a mapping"),
]
def _is_pool(v: Any) -> bool:
    if _is_int(v):
        return v > 0
    return (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)
            and v[0] <= v[1])


# A fixed actor pool (N) or an autoscaling one ([min, max]).
PoolSize = Annotated[
    int | tuple[int, int],
    _expect(_is_pool, "expected a positive integer, or [min, max] with 0 < min <= max"),
]
TextList = Annotated[
    list[str],
    _expect(
        lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
        "expected a list of strings",
    ),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VideoSpec(_Section):
    """With images.format: video, which frames of each video are labelled (docs/video.md)."""

    every: PositiveInt = 1  # every Nth frame
    fps: PositiveFloat | None = None  # or about this many frames a second, by the frames' timestamps
    start: NonNegativeFloat = 0.0  # seconds into the video
    end: PositiveFloat | None = None
    max_frames: PositiveInt | None = None  # at most this many frames of a video
    max_seconds: PositiveFloat = 86_400.0  # a longer video is an error row, not labelled
    frames_per_task: PositiveInt = 64  # sampled frames per read task, a range cut at a keyframe where one is near
    extensions: TextList = [".mp4", ".mov", ".mkv", ".webm", ".avi"]


class ImagesSpec(_Section):
    """Where the images are."""

    path: Text
    format: Literal["files", "webdataset", "parquet", "video"] = "files"
    storage_options: Options = {}
    image_column: Text = "image"  # parquet: binary, or a struct with `bytes` (and `path`), as HF datasets export
    key_column: Text | None = None  # parquet: the image key (default: image.path, else file/row)
    # With an S3 Inventory manifest.json as images.path: the source bucket's objects under this prefix, keyed
    # relative to it (as a listing of s3://BUCKET/PREFIX/ keys them); default: the whole bucket.
    inventory_prefix: str | None = None
    extensions: TextList = [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"]
    max_pixels: PositiveInt = 100_000_000
    jpeg_draft: Flag = False  # decode a JPEG at 1/2-1/8 size when its crops need no more pixels (geometry.jpeg_reduction)
    region_decode: Flag = True  # decode only the part of a JPEG its crops read (imaging/jpeg_region.py): same pixels
    # With resources.crop_in: pose_device on a GPU, who decodes the JPEGs (imaging/decode_device.py):
    # auto = nvimgcodec where installed, else nvjpeg where torchvision is, else pillow (Pillow's pixels).
    gpu_decoder: Literal["auto", "pillow", "nvimgcodec", "nvjpeg"] = "auto"
    video: VideoSpec = VideoSpec()  # images.format: video: the frames to label


class DetectorSpec(_Section):
    """An RT-DETR (or RT-DETRv2) checkpoint that finds the boxes."""

    model: Text = "PekingU/rtdetr_r50vd_coco_o365"
    revision: Text | None = None
    threshold: Fraction = 0.3
    max_per_image: PositiveInt = 100
    min_size: NonNegativeFloat = 0.0
    nms_iou: Fraction | None = None
    batch_size: PositiveInt = 8
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class BoxesSpec(_Section):
    """Where the person (or animal) boxes come from."""

    source: Literal["coco", "table", "detector", "inline"] = "coco"
    path: Text | None = None
    detector: DetectorSpec = DetectorSpec()
    detect_missing: Flag = False
    storage_options: Options | None = None
    categories: TextList | None = ["person"]
    min_area: NonNegativeFloat = 0.0
    include_crowd: Flag = False
    min_score: Fraction = 0.0
    image_key_column: Text = "image_key"
    bbox_column: Text = "bbox"
    score_column: Text = "score"
    category_column: Text = "category"


class ExpertSpec(_Section):
    """One pose expert: a checkpoint, its ViTPose++ dataset_index, and what its heatmaps mean."""

    model: Text | None = None  # default: pose.model
    revision: Text | None = None
    dataset_index: Annotated[int, _expect(lambda v: _is_int(v) and v >= 0, "expected an integer >= 0")] | None = None
    keypoint_schema: Text | None = None  # default: the built-in expert's schema
    head_schema: Text | None = None  # what the checkpoint's head emits, when its config does not say (overrides)


class PoseSpec(_Section):
    """The ViTPose checkpoint(s) and how to run them."""

    model: Text
    revision: Text | None = None
    expert: Text = "coco"  # the expert for categories without a routing rule
    experts: Annotated[
        dict[str, ExpertSpec], _expect(lambda v: isinstance(v, dict), "expected a mapping of expert names")
    ] = {}
    routing: Annotated[
        dict[str, str],
        _expect(
            lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
            "expected a mapping of category -> expert name",
        ),
    ] = {}
    batch_size: PositiveInt | None = None  # crops per forward pass; default by device (pipeline.layout)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    flip_test: Flag = False
    fold_expert: Flag = False  # fold a MoE checkpoint's one used expert into a dense model at load time
    compile: Flag = False  # torch.compile the model: faster forward, a compile per actor before the first batch
    decode: Literal["transformers", "original"] = "transformers"  # DARK smoothing: sigma 0.8, or cv2's k=11 (2.0)
    track: Flag = False  # video: link each video's instances across its frames (track_id)


class ResourcesSpec(_Section):
    """How much of the cluster each stage takes."""

    pose_actors: PoolSize | None = None  # auto: pipeline.layout (one per GPU; on CPU two per node)
    cpus_per_pose_actor: PositiveFloat = 1.0
    threads_per_pose_actor: PositiveInt | None = None  # torch threads of a CPU pose actor; default: pipeline.layout
    gpus_per_pose_actor: NonNegativeFloat | None = None
    detector_actors: PoolSize = 1
    cpus_per_detector_actor: PositiveFloat = 1.0
    gpus_per_detector_actor: NonNegativeFloat | None = None
    images_per_crop_task: PositiveInt = 16
    # The most boxes whose crops a crop task or a pose actor holds at once: an image with more is cut into
    # parts of this many, a block's crops a part at a time (pipeline/blocks.py): memory bounded per call.
    boxes_per_crop_task: PositiveInt = 256
    # Where images are decoded and cropped: Ray tasks of their own, inside the pose actors, or on the
    # pose actors' device (images.gpu_decoder); auto = pose_actor on CPU, tasks on a GPU.
    crop_in: Literal["auto", "tasks", "pose_actor", "pose_device"] = "auto"
    # Calls a pose actor runs at once, in threads: above 1, one call's crops and rows are made while
    # another's forwards run, and on a GPU one's forward is queued while another's runs (forwards are
    # submitted one at a time). Default: pipeline.layout (2 on a GPU, 1 on CPU).
    pose_calls_per_actor: PositiveInt | None = None
    num_cpus: PositiveInt | None = None


class OutputSpec(_Section):
    """Where the Parquet goes."""

    path: Text
    mode: Literal["error", "overwrite", "resume", "append"] = "error"
    storage_options: Options | None = None
    images_per_shard: PositiveInt = 10_000
    row_group_size: PositiveInt = 65_536
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


class LimitsSpec(_Section):
    """How much failure a job tolerates."""

    max_retries: Annotated[int, _expect(lambda v: _is_int(v) and v >= 0, "expected an integer >= 0")] = 3
    max_errored_fraction: Fraction = 0.1


class JobSpec(_Section):
    """A whole job, validated. Build it with `load_job_spec`."""

    name: Annotated[
        str,
        _expect(
            lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v),
            "expected letters, digits, '.', '_' or '-' (at most 128)",
        ),
    ] = "raypose-job"
    images: ImagesSpec
    boxes: BoxesSpec
    pose: PoseSpec
    resources: ResourcesSpec = ResourcesSpec()
    limits: LimitsSpec = LimitsSpec()
    output: OutputSpec

    def boxes_storage_options(self) -> dict[str, Any]:
        """Boxes read with their own options, or the images' when none are given."""
        if self.boxes.storage_options is None:
            return dict(self.images.storage_options)
        return dict(self.boxes.storage_options)

    def output_storage_options(self) -> dict[str, Any]:
        """Output written with its own options, or the images' when none are given."""
        if self.output.storage_options is None:
            return dict(self.images.storage_options)
        return dict(self.output.storage_options)

    def redacted(self) -> dict[str, Any]:
        """The spec as plain data with every credential-like option replaced, for logs and manifests."""
        data = self.model_dump(mode="json")
        # Only storage options carry credentials; redacting the whole spec would hide fields
        # such as boxes.image_key_column (its name contains "key") and drop them from the fingerprint.
        for section in ("images", "boxes", "output"):
            data[section]["storage_options"] = redact(data[section]["storage_options"])
        return data

    def fingerprint(self) -> str:
        """A stable hash of the spec (credentials excluded)."""
        blob = json.dumps(self.redacted(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def redact(value: Any, key: str = "") -> Any:
    """Replace the values of credential-like keys (key, secret, token, ...) with '***'."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key and SECRET_KEY_PATTERN.search(key) and isinstance(value, str) and value:
        return "***"
    return value


def load_job_spec(path: str | os.PathLike, overrides: list[str] = ()) -> JobSpec:
    """Read a job YAML, apply `dotted.key=value` overrides, and validate it."""
    path = Path(path)
    try:
        text = read_job_text(path)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the job file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    try:
        raw = load_bounded_yaml(text, str(path))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raise SpecError(f"{path}: the job file is empty; expected the sections images, boxes, pose and output "
                        "(see jobs/quickstart.yaml)")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    resolve_paths(raw, path.resolve().parent)
    overridden = {apply_override(raw, override) for override in overrides}
    resolve_paths(raw, Path.cwd(), fields=overridden)
    return parse_job_spec(raw)


def parse_job_spec(raw: dict[str, Any]) -> JobSpec:
    """Validate plain data into a JobSpec, raising one SpecError that lists every problem."""
    try:
        spec = JobSpec.model_validate(raw)
        problems = cross_field_problems(spec)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
    if problems:
        if len(problems) == 1:  # one problem reads as one line in a job's log
            raise SpecError(f"invalid job spec: {problems[0]}") from None
        raise SpecError("invalid job spec:\n  " + "\n  ".join(problems)) from None
    return spec


def cross_field_problems(spec: JobSpec) -> list[str]:
    """What the field types cannot say: required-if, and names that must refer to each other."""
    problems = []
    boxes, pose = spec.boxes, spec.pose
    if boxes.source == "inline" and spec.images.format in ("files", "video"):
        problems.append("boxes.source: inline boxes come with webdataset or parquet images (images.format)")
    video = spec.images.video
    if video.fps is not None and video.every != 1:
        problems.append("images.video.fps: give fps or every, not both")
    if video.end is not None and video.end <= video.start:
        problems.append(f"images.video.end: expected a time after images.video.start ({video.start}), got {video.end}")
    if pose.track and spec.images.format != "video":
        problems.append("pose.track: links instances across a video's frames: only with images.format: video")
    if boxes.source in ("coco", "table") and boxes.path is None:
        problems.append(f"boxes.path: required with boxes.source: {boxes.source}")
    if boxes.source == "detector" and boxes.detect_missing:
        problems.append("boxes.detect_missing: only with boxes.source coco, table or inline (a detector job detects everything)")
    if spec.resources.crop_in == "pose_device" and spec.images.jpeg_draft:
        problems.append("images.jpeg_draft: only where the CPU decodes (resources.crop_in is pose_device)")
    if spec.images.gpu_decoder in ("nvimgcodec", "nvjpeg") and spec.resources.crop_in != "pose_device":
        problems.append(f"images.gpu_decoder: {spec.images.gpu_decoder} decodes on the pose device only "
                        f"(resources.crop_in: pose_device; it is {spec.resources.crop_in})")
    known = sorted(set(EXPERT_SCHEMA) | set(pose.experts))
    if pose.expert not in known:
        problems.append(f"pose.expert: unknown expert {pose.expert!r}; expected one of: {', '.join(known)}")
    for category, expert in pose.routing.items():
        if expert not in known:
            problems.append(
                f"pose.routing.{category}: unknown expert {expert!r}; expected one of: {', '.join(known)}"
            )
    return problems


def apply_override(raw: dict[str, Any], override: str) -> str:
    """Set `dotted.key=value` in the raw spec and return the key; the value is parsed as YAML (`64` is a number)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {override!r}: expected dotted.key=value")
    try:
        value = load_bounded_yaml(text, f"--set {key.strip()}") if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise SpecError(f"--set {key}: {where} is not a section")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        hint = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{loc}: unknown key{suggestion}; expected one of: {', '.join(allowed)}"
    if kind == "missing":
        return f"{loc}: required, but missing"
    if kind == "literal_error":
        return f"{loc}: expected one of {err['ctx']['expected']}, got {_shown(given)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{loc}: expected a mapping, got {_shown(given)}"
    message = err["msg"][0].lower() + err["msg"][1:]
    return f"{loc}: {message}, got {_shown(given)}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        annotation = model.model_fields[part].annotation
        model = next(
            (t for t in (annotation, *getattr(annotation, "__args__", ())) if isinstance(t, type) and issubclass(t, BaseModel)),
            model,
        )
    return list(model.model_fields)


def _shown(value: Any, width: int = 80) -> str:
    """`value` as JSON for an error message, cut at `width`: serialised only as far as it is shown."""
    chunks, length = [], 0
    try:
        for chunk in json.JSONEncoder().iterencode(value):  # a generator: a huge value is not walked to its end
            chunks.append(chunk)
            length += len(chunk)
            if length > width:
                break
        text = "".join(chunks)
    except (TypeError, ValueError):  # not JSON (a YAML date), or a value that contains itself
        short = reprlib.Repr()
        short.maxstring = short.maxother = width
        text = short.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
