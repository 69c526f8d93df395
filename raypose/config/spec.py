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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema
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


def _is_pool(v: Any) -> bool:
    if _is_int(v):
        return v > 0
    return (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)
            and v[0] <= v[1])


# Each type: its strict check, the message that names what was expected, and the JSON Schema that says
# the same to an editor (`raypose schema`).
PositiveInt = Annotated[int, _expect(lambda v: _is_int(v) and v > 0, "expected a positive integer"),
                        WithJsonSchema({"type": "integer", "minimum": 1})]
NonNegativeInt = Annotated[int, _expect(lambda v: _is_int(v) and v >= 0, "expected an integer >= 0"),
                           WithJsonSchema({"type": "integer", "minimum": 0})]
NonNegativeFloat = Annotated[float, _expect(lambda v: _is_number(v) and v >= 0, "expected a number >= 0"),
                             WithJsonSchema({"type": "number", "minimum": 0})]
PositiveFloat = Annotated[float, _expect(lambda v: _is_number(v) and v > 0, "expected a number > 0"),
                          WithJsonSchema({"type": "number", "exclusiveMinimum": 0})]
Fraction = Annotated[float, _expect(lambda v: _is_number(v) and 0 <= v <= 1, "expected a number between 0 and 1"),
                     WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1})]
Flag = Annotated[bool, _expect(lambda v: isinstance(v, bool), "expected true or false"),
                 WithJsonSchema({"type": "boolean"})]
Text = Annotated[str, _expect(lambda v: isinstance(v, str) and v != "", "expected a non-empty string"),
                 WithJsonSchema({"type": "string", "minLength": 1})]
Options = Annotated[
    dict[str, Any],
    _expect(lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "expected a mapping"),
    WithJsonSchema({"type": "object"}),
]
# A fixed actor pool (N) or an autoscaling one ([min, max]).
PoolSize = Annotated[
    int | tuple[int, int],
    _expect(_is_pool, "expected a positive integer, or [min, max] with 0 < min <= max"),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1},
                              {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2,
                               "maxItems": 2}]}),
]
TextList = Annotated[
    list[str],
    _expect(
        lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
        "expected a list of strings",
    ),
    WithJsonSchema({"type": "array", "items": {"type": "string", "minLength": 1}}),
]
JOB_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
JobName = Annotated[
    str,
    _expect(lambda v: isinstance(v, str) and re.fullmatch(JOB_NAME, v),
            "expected letters, digits, '.', '_' or '-' (at most 128)"),
    WithJsonSchema({"type": "string", "pattern": f"^{JOB_NAME}$"}),
]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


def _field(default: Any, description: str, *, decides_rows: bool) -> Any:
    """A spec field that documents itself: what it means, and whether it decides the output rows.

    The fields that decide the rows make the result key (output/resume.py): a resumed output never mixes
    rows made with different values of them. `default` is `...` for a required field.
    """
    return Field(default, description=description, json_schema_extra={"decides_rows": decides_rows})


def _section(default: Any, description: str) -> Any:
    """A field that is a section of its own (its fields say whether they decide the rows)."""
    return Field(default, description=description)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VideoSpec(_Section):
    """With `images.format: video`, which frames of each video are labelled (docs/video.md)."""

    every: PositiveInt = _field(1, "Every Nth frame, counted from the first frame at or after `start`.",
                                decides_rows=True)
    fps: PositiveFloat | None = _field(
        None, "Instead of `every`: the first frame in each 1/fps second, by the frames' own timestamps.",
        decides_rows=True)
    start: NonNegativeFloat = _field(0.0, "Seconds into the video where sampling starts.", decides_rows=True)
    end: PositiveFloat | None = _field(None, "Seconds into the video where sampling ends (excluded).",
                                       decides_rows=True)
    max_frames: PositiveInt | None = _field(None, "At most this many sampled frames of a video.", decides_rows=True)
    max_seconds: PositiveFloat = _field(
        86_400.0, "A longer video is not labelled: one errors-table row (stage `decode`).", decides_rows=True)
    frames_per_task: PositiveInt = _field(
        64, "Consecutive sampled frames a read task decodes in one go, from the keyframe before the first.",
        decides_rows=False)
    extensions: TextList = _field([".mp4", ".mov", ".mkv", ".webm", ".avi"],
                                  "Which listed files are videos (case-insensitive).", decides_rows=True)


class ImagesSpec(_Section):
    """Where the images are."""

    path: Text = _field(
        ..., "A directory (listed recursively), a glob (`s3://b/imgs/**/*.jpg`), or a manifest `.txt`/`.lst` "
        "(one path or URL a line; relative lines are relative to the manifest), or an S3 Inventory "
        "`manifest.json`. Local or any fsspec URL. Which images an output holds is each image's own fingerprint's "
        "to say, so the path may change between runs that build on each other.", decides_rows=False)
    format: Literal["files", "webdataset", "parquet", "video"] = _field(
        "files", "`files`: image files; `webdataset`: `.tar` shards, keys are member names (`000123.jpg`); "
        "`parquet`: files with an image-bytes column; `video`: video files, their sampled frames labelled as images "
        "(keys `VIDEO#NNNNNN`; `images.video`).", decides_rows=True)
    storage_options: Options = _field(
        {}, "Passed to fsspec/s3fs (`endpoint_url`, `key`, `secret`, `anon`, `client_kwargs`, `config_kwargs`, ...); "
        "redacted in every log and manifest. For `s3://`, `config_kwargs.retries` defaults to "
        "`{mode: standard, total_max_attempts: 10}`. `boxes` and `output` reuse these unless they set their own.",
        decides_rows=False)
    image_column: Text = _field(
        "image", "Parquet images: the bytes column, binary or a struct with `bytes` (and `path`, the key), "
        "as Hugging Face datasets export.", decides_rows=True)
    key_column: Text | None = _field(
        None, "Parquet images: a column holding the image key (default: `image.path`, else `FILE/ROW`).",
        decides_rows=True)
    inventory_prefix: str | None = _field(
        None, "With an S3 Inventory `manifest.json` as `images.path`: the source bucket's objects under this prefix, "
        "keyed relative to it (as a listing of `s3://BUCKET/PREFIX/` keys them); default: the whole bucket.",
        decides_rows=False)
    extensions: TextList = _field(
        [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"],
        "Which listed files are images (case-insensitive).", decides_rows=True)
    max_pixels: PositiveInt = _field(
        100_000_000, "Larger images are refused as possible decompression bombs (an errors-table row).",
        decides_rows=True)
    jpeg_draft: Flag = _field(
        False, "Decode a JPEG at 1/2, 1/4 or 1/8 size (in the DCT) when every crop of it samples no finer: "
        "a cheaper crop stage, but crop pixels become block means, no longer the reference's.", decides_rows=True)
    region_decode: Flag = _field(
        True, "Decode only the rectangle of a JPEG its crops read (nvImageCodec's libjpeg-turbo, Linux): the same "
        "pixels as Pillow's full decode, less work. Kinds not proven identical, damaged files and non-JPEGs are "
        "decoded whole by Pillow.", decides_rows=False)
    gpu_decoder: Literal["auto", "pillow", "nvimgcodec", "nvjpeg"] = _field(
        "auto", "With `resources.crop_in: pose_device` on a GPU, who decodes the JPEGs: `nvimgcodec` (the GPU's "
        "JPEG engine, only the regions the crops read), `nvjpeg` (torchvision, whole images) or `pillow` "
        "(Pillow's pixels). `auto`: nvimgcodec where installed, else nvjpeg where torchvision is, else pillow. "
        "GPU decoders' pixels differ slightly from Pillow's; the decoder used is part of the result key.",
        decides_rows=False)
    video: VideoSpec = _section(VideoSpec(), VideoSpec.__doc__)


class DetectorSpec(_Section):
    """An RT-DETR (or RT-DETRv2) checkpoint that finds the boxes."""

    model: Text = _field("PekingU/rtdetr_r50vd_coco_o365",
                         "Hub id or local directory of an RT-DETR or RT-DETRv2 checkpoint.", decides_rows=True)
    revision: Text | None = _field(None, "Hub revision (branch, tag or commit).", decides_rows=True)
    threshold: Fraction = _field(0.3, "Minimum detection score.", decides_rows=True)
    max_per_image: PositiveInt = _field(100, "Keep this many best-scored boxes per image.", decides_rows=True)
    min_size: NonNegativeFloat = _field(0.0, "Drop boxes narrower or shorter than this (pixels).", decides_rows=True)
    nms_iou: Fraction | None = _field(
        None, "Class-aware NMS at this IoU (RT-DETR needs none; off by default).", decides_rows=True)
    batch_size: PositiveInt = _field(8, "Images per detector forward pass.", decides_rows=False)
    dtype: DType = _field("auto", "As `pose.dtype`; the resolved dtype is part of the result key.",
                          decides_rows=False)
    device: Device = _field("auto", "As `pose.device`; the resolved device is part of the result key.",
                            decides_rows=False)


class BoxesSpec(_Section):
    """Where the person (or animal) boxes come from."""

    source: Literal["coco", "table", "detector", "inline"] = _field(
        "coco", "`coco`: a COCO annotations JSON; `table`: a Parquet or JSON-lines table, one row per box; "
        "`detector`: RT-DETR finds them (`boxes.detector`); `inline`: with `webdataset`/`parquet` images, each "
        "sample's own boxes (the `.json` member's, or the row's `bbox_column`, `category_column`, "
        "`score_column`).", decides_rows=True)
    path: Text | None = _field(None, "The boxes file, local or URL; required with `coco` and `table`. Which boxes an "
                               "image has is part of its own fingerprint, not of the result key.", decides_rows=False)
    detector: DetectorSpec = _section(DetectorSpec(), "The detector, with `source: detector` or `detect_missing`.")
    detect_missing: Flag = _field(
        False, "With `coco`/`table`/`inline`: detect boxes for the listed images the file has none for.",
        decides_rows=True)
    storage_options: Options | None = _field(
        None, "fsspec options for the boxes file (default: `images.storage_options`).", decides_rows=False)
    categories: TextList | None = _field(
        ["person"], "Category names to keep (`null` for all): the COCO file's category names or the detector's "
        "labels; an unknown name is an error.", decides_rows=True)
    min_area: NonNegativeFloat = _field(0.0, "Drop smaller boxes (COCO `area`, else w x h).", decides_rows=True)
    include_crowd: Flag = _field(False, "Keep COCO `iscrowd` boxes.", decides_rows=True)
    min_score: Fraction = _field(0.0, "Drop boxes scored lower (boxes without a score are kept).", decides_rows=True)
    image_key_column: Text = _field("image_key", "Box table: the image key column.", decides_rows=True)
    bbox_column: Text = _field(
        "bbox", "Box table: the COCO `[x, y, w, h]` column (an `annotation_id` column is kept when present).",
        decides_rows=True)
    score_column: Text = _field("score", "Box table: the box score column.", decides_rows=True)
    category_column: Text = _field("category", "Box table: the category column.", decides_rows=True)

    @property
    def detects(self) -> bool:
        """Whether the detector finds some images' boxes (all of them, or those the file has none for)."""
        return self.source == "detector" or self.detect_missing


class ExpertSpec(_Section):
    """One pose expert: a checkpoint, its ViTPose++ dataset_index, and what its heatmaps mean."""

    model: Text | None = _field(None, "The checkpoint that serves this expert (default: `pose.model`).",
                                decides_rows=True)
    revision: Text | None = _field(None, "Hub revision of this expert's `model`.", decides_rows=True)
    dataset_index: NonNegativeInt | None = _field(
        None, "ViTPose++ (MoE) `dataset_index` (default: the built-in expert's); required for a custom expert on a "
        "MoE checkpoint, refused for a dense one.", decides_rows=True)
    keypoint_schema: Text | None = _field(
        None, "`coco17`, `aic14`, `mpii16`, `ap10k17`, `apt36k17` or `wholebody133` (default: the built-in "
        "expert's); required for a custom expert unless its checkpoint records one.", decides_rows=True)
    head_schema: Text | None = _field(
        None, "What the checkpoint's head emits, overriding what its config says or raypose assumes.",
        decides_rows=True)


class PoseSpec(_Section):
    """The ViTPose checkpoint(s) and how to run them."""

    model: Text = _field(..., "Hub id or local directory of a `VitPoseForPoseEstimation` checkpoint.",
                         decides_rows=True)
    revision: Text | None = _field(None, "Hub revision (branch, tag or commit).", decides_rows=True)
    expert: Text = _field("coco", "The expert for boxes whose category has no routing rule.", decides_rows=True)
    experts: Annotated[
        dict[str, ExpertSpec], _expect(lambda v: isinstance(v, dict), "expected a mapping of expert names")
    ] = _field({}, "Expert name -> its checkpoint, `dataset_index` and keypoint schema (built-in experts: coco, "
               "aic, mpii, ap10k, apt36k, wholebody).", decides_rows=True)
    routing: Annotated[
        dict[str, str],
        _expect(
            lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
            "expected a mapping of category -> expert name",
        ),
    ] = _field({}, "Category -> expert, e.g. `{person: coco, dog: ap10k}`.", decides_rows=True)
    batch_size: PositiveInt | None = _field(
        None, "Crops per forward pass (default by device: 8 on CPU, 256 on GPU).", decides_rows=False)
    dtype: DType = _field(
        "auto", "`auto`: bfloat16 on GPUs that have it, else float16; on CPU bfloat16 where the CPU computes it "
        "natively (AVX512-BF16, AMX), else float32. bfloat16 moves keypoints by its rounding: set `float32` for "
        "reference-exact keypoints. The resolved dtype is part of the result key.", decides_rows=False)
    device: Device = _field(
        "auto", "`auto`: GPU when the cluster has GPUs; `cuda` is an error on a cluster without GPUs unless "
        "`resources.gpus_per_pose_actor` promises them to an autoscaler. The resolved device is part of the "
        "result key.", decides_rows=False)
    flip_test: Flag = _field(False, "Average each crop's heatmaps with its mirror's (left and right swapped).",
                             decides_rows=True)
    uncertainty: Literal["auto", "none", "flip"] = _field(
        "auto", "Flip disagreement columns (`keypoint_flip_error`, `flip_oks`, `instance_doubt`): `auto` = `flip` "
        "when `flip_test` is on (no extra forward); `flip` with `flip_test` off runs the mirrored forward for them "
        "alone; `none` leaves them null. Whether they are on is part of the result key.", decides_rows=False)
    fold_expert: Flag = _field(
        False, "Fold a ViTPose++ (MoE) checkpoint's one used expert into a dense model at load time: same "
        "heatmaps, faster.", decides_rows=True)
    compile: Flag = _field(
        False, "`torch.compile` the model: a faster forward, after a compile per actor before its first batch.",
        decides_rows=False)
    decode: Literal["transformers", "original"] = _field(
        "transformers", "DARK smoothing of the heatmaps: `transformers` (sigma 0.8, parity with transformers) or "
        "`original` (the ViTPose code's cv2 kernel 11, sigma 2.0).", decides_rows=True)
    track: Flag = _field(
        False, "Video: link each video's instances across its sampled frames (`track_id`, by box IoU and keypoint "
        "OKS), as each shard commits.", decides_rows=True)


class ResourcesSpec(_Section):
    """How much of the cluster each stage takes."""

    pose_actors: PoolSize | None = _field(
        None, "Pose actors (each loads the model once): `N`, or `[min, max]` for a pool Ray Data grows as work "
        "queues up. Default: one per GPU; on CPU two per node when they make their own crops, else one.",
        decides_rows=False)
    cpus_per_pose_actor: PositiveFloat = _field(1.0, "CPUs each pose actor reserves in Ray's accounting.",
                                                decides_rows=False)
    threads_per_pose_actor: PositiveInt | None = _field(
        None, "Torch threads of a CPU pose actor (default: its node's CPUs / pose actors).", decides_rows=False)
    gpus_per_pose_actor: NonNegativeFloat | None = _field(
        None, "GPUs per pose actor (default: 1 when the cluster has GPUs, else 0).", decides_rows=False)
    detector_actors: PoolSize = _field(1, "Detector actors: `N` or `[min, max]`.", decides_rows=False)
    cpus_per_detector_actor: PositiveFloat = _field(1.0, "CPUs each detector actor reserves.", decides_rows=False)
    gpus_per_detector_actor: NonNegativeFloat | None = _field(
        None, "GPUs per detector actor (default: 1 when the cluster has GPUs, else 0).", decides_rows=False)
    images_per_crop_task: PositiveInt = _field(16, "Images per crop task (one Ray block).", decides_rows=False)
    boxes_per_crop_task: PositiveInt = _field(
        256, "The most boxes whose crops a crop task or a pose actor holds at once: an image with more is cut into "
        "parts of this many, a block's crops are cut a part at a time, so memory is bounded per call.",
        decides_rows=False)
    crop_in: Literal["auto", "tasks", "pose_actor", "pose_device"] = _field(
        "auto", "Where images are decoded and cropped: `tasks` (Ray tasks of their own), `pose_actor` (inside the "
        "pose actors), or `pose_device` (on the pose actors' device, decoded by `images.gpu_decoder`). "
        "`auto`: `pose_actor` on CPU, `tasks` on a GPU.", decides_rows=False)
    pose_calls_per_actor: PositiveInt | None = _field(
        None, "Calls a pose actor runs at once, in threads: above 1, one call's crops and rows are made while "
        "another's forwards run (default: 2 on a GPU, 1 on CPU).", decides_rows=False)
    num_cpus: PositiveInt | None = _field(None, "CPUs of the embedded Ray (default: all; ignored on a cluster).",
                                          decides_rows=False)


class OutputSpec(_Section):
    """Where the Parquet goes."""

    path: Text = _field(..., "The output folder, local or URL.", decides_rows=False)
    mode: Literal["error", "overwrite", "resume", "append"] = _field(
        "error", "`error`: refuse a path that holds raypose output; `overwrite`: replace it; `resume`: keep the "
        "shards an earlier run committed and do the rest (as `submit --resume`); `append`: keep what earlier runs "
        "labelled and label what is new or changed since, in new shards.", decides_rows=False)
    storage_options: Options | None = _field(
        None, "fsspec options for the output (default: `images.storage_options`).", decides_rows=False)
    images_per_shard: PositiveInt = _field(
        10_000, "Images per shard: the unit of commit and of resume.", decides_rows=False)
    row_group_size: PositiveInt = _field(65_536, "Rows per Parquet row group.", decides_rows=False)
    compression: Literal["zstd", "snappy", "gzip", "none"] = _field("zstd", "Parquet compression.",
                                                                      decides_rows=False)


class LimitsSpec(_Section):
    """How much failure a job tolerates."""

    max_retries: NonNegativeInt = _field(
        3, "Retries of a crop task or a detector or pose actor that dies.", decides_rows=False)
    max_errored_fraction: Fraction = _field(
        0.1, "The job fails (exit code 1) when more of its rows than this are errors.", decides_rows=False)


class JobSpec(_Section):
    """A whole job, validated. Build it with `load_job_spec`."""

    model_config = ConfigDict(title="raypose job")  # with _Section's: extra fields refused, frozen

    name: JobName = _field("raypose-job", "The job's name (letters, digits, `.`, `_`, `-`): the job id's prefix.",
                           decides_rows=False)
    images: ImagesSpec = _section(..., ImagesSpec.__doc__)
    boxes: BoxesSpec = _section(..., BoxesSpec.__doc__)
    pose: PoseSpec = _section(..., PoseSpec.__doc__)
    resources: ResourcesSpec = _section(ResourcesSpec(), ResourcesSpec.__doc__)
    limits: LimitsSpec = _section(LimitsSpec(), LimitsSpec.__doc__)
    output: OutputSpec = _section(..., OutputSpec.__doc__)

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


def row_deciding_fields(section: type[BaseModel] = JobSpec, prefix: str = "") -> tuple[str, ...]:
    """The dotted names of the fields that decide the output rows (`decides_rows`), in spec order.

    Sections are walked into; a field that is a mapping of sections (`pose.experts`) counts as one field.
    """
    names: list[str] = []
    for name, info in section.model_fields.items():
        if (inner := section_type(info.annotation)) is not None:
            names += row_deciding_fields(inner, f"{prefix}{name}.")
        elif (info.json_schema_extra or {}).get("decides_rows"):
            names.append(f"{prefix}{name}")
    return tuple(names)


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section a field's annotation is (a model of its own), else None."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def redact(value: Any, key: str = "") -> Any:
    """Replace the values of credential-like keys (key, secret, token, ...) with '***'."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key and SECRET_KEY_PATTERN.search(key) and isinstance(value, str) and value:
        return "***"
    return value


def load_job_spec(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()) -> JobSpec:
    """Read a job YAML, apply overrides (`dotted.key=value` strings, or a mapping of dotted keys to values), and
    validate it."""
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
    return parse_job_spec(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply overrides to a raw spec in place (their relative paths are relative to the working directory)."""
    if isinstance(overrides, Mapping):
        overridden = {set_field(raw, key, value, f"overrides[{key!r}]") for key, value in overrides.items()}
    else:
        overridden = {apply_override(raw, override) for override in overrides}
    resolve_paths(raw, Path.cwd(), fields=overridden)
    return raw


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
    return set_field(raw, key, value, f"--set {key}")


def set_field(raw: dict[str, Any], key: str, value: Any, where: str) -> str:
    """Set the dotted `key` of a raw spec to `value` (sections made as needed) and return the key."""
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError(f"{where}: expected a dotted key such as pose.batch_size")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{where}: {'.'.join(parts[: depth + 1])} is not a section")
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
