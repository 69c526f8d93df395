"""The job's layout: every "auto" resolved once, from the spec and the cluster, before the Dataset is built.

Device, dtype, GPUs and CPUs per actor, actor counts, torch threads, batch size and where the
crops are made are decided here and nowhere else, and checked against the cluster: a job that
asks for what the cluster cannot give fails as a spec error before any actor starts. The
measurements behind each default are in benchmarks/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from raypose.config.spec import JobSpec
from raypose.errors import SpecError
from raypose.imaging.decode_device import (
    NvImageCodecDecoder,
    NvjpegDecoder,
    PillowDecoder,
)
from raypose.imaging.jpeg_region import region_decoder_available
from raypose.models.routing import Routing
from raypose.pipeline.crop_stage import CropOptions, make_crops_in_parts, plan_crops
from raypose.pipeline.croppers import CpuCropper, CropColumn, DeviceCropper
from raypose.pipeline.pose_stage import PoseSettings

# On CPU a small batch keeps a forward's activations in cache; on a GPU a large one fills it.
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 256
# Two calls a GPU actor: one's forward is queued while the other's runs or its rows are made.
GPU_CALLS_PER_ACTOR = 2
# GPUs without bfloat16 (compute capability below 8.0), as Ray names them (accelerator_type:NAME).
NO_BF16_GPUS = frozenset({"V100", "T4", "P100", "P40", "P4", "K80", "M60", "Tesla-V100", "Tesla-T4"})


@dataclass(frozen=True)
class ClusterShape:
    """What the layout needs to know of the Ray cluster (`runtime.cluster_shape` reads it)."""

    gpus: float = 0.0  # GPUs in the whole cluster
    node_cpus: int = 1  # CPUs of the smallest node that has any: what an actor can count on wherever it lands
    nodes: int = 1  # nodes with CPUs
    accelerators: tuple[str, ...] = ()  # GPU kinds, as Ray's accelerator_type:NAME resources name them
    bf16: bool | None = None  # whether its GPUs run bfloat16 (None: not known, taken as yes)
    cpu_bf16: bool = False  # whether its CPUs have native bfloat16 (AVX512-BF16 or AMX); False when not known


@dataclass(frozen=True)
class ActorPool:
    """An actor pool as Ray reserves it: how many actors (fixed, or autoscaling from min to max), and each
    one's CPUs, GPUs and concurrent calls."""

    min_actors: int
    max_actors: int
    cpus: float
    gpus: float
    calls: int = 1

    @classmethod
    def sized(cls, size: int | tuple[int, int], cpus: float, gpus: float, calls: int = 1) -> ActorPool:
        """A pool of `size` actors, or of [min, max] (Ray Data then adds actors as work queues up)."""
        low, high = (size, size) if isinstance(size, int) else size
        return cls(min_actors=low, max_actors=high, cpus=cpus, gpus=gpus, calls=calls)

    @property
    def autoscales(self) -> bool:
        return self.min_actors != self.max_actors


@dataclass(frozen=True)
class CropPlacement:
    """Where images are decoded and cut: the Ray tasks before the pose actors (if any) and the actors' cropper.

    name     tasks | pose_actor | pose_device, as resolved from resources.crop_in
    task     the CPU stage's function (make_crops_in_parts, plan_crops) and its keyword arguments, or None
    cropper  what each pose actor does with a batch (croppers.CropColumn, CpuCropper, DeviceCropper)
    rows_per_call  crop rows a pose call takes, or a whole block of image rows (None)
    decoder  pillow | nvimgcodec | nvjpeg: whose pixels the crops are cut from (part of the result fingerprint)
    jpeg_regions  whether JPEGs are decoded only where their crops read (`jpeg_region`; Pillow's pixels)
    """

    name: str
    task: tuple[Callable, dict[str, Any]] | None
    cropper: Any
    rows_per_call: int | None
    decoder: str = "pillow"
    jpeg_regions: bool = False


@dataclass(frozen=True)
class Layout:
    """The resolved job: what each stage runs on and how much of the cluster it takes."""

    pose: PoseSettings
    pose_pool: ActorPool
    crops: CropPlacement
    images_per_task: int
    boxes_per_task: int = 256
    detector_device: str | None = None  # None: no detector stage
    detector_dtype: str | None = None
    detector_pool: ActorPool | None = None
    detector_threads: int = 1
    cluster: ClusterShape = field(default_factory=ClusterShape)

    def describe(self) -> dict[str, Any]:
        """The layout as plain data, for the manifest and the job's log."""
        described = {
            "pose": {**asdict(self.pose), **asdict(self.pose_pool)},
            "crop_in": self.crops.name,
            "decoder": self.crops.decoder,
            "jpeg_regions": self.crops.jpeg_regions,
            "images_per_task": self.images_per_task,
            "boxes_per_task": self.boxes_per_task,
            "cluster": asdict(self.cluster),
        }
        if self.detector_pool is not None:
            described["detector"] = {"device": self.detector_device, "dtype": self.detector_dtype,
                                     **asdict(self.detector_pool)}
        return described


def resolve_layout(spec: JobSpec, routing: Routing, cluster: ClusterShape, images: int,
                   detecting: bool = False, source_tasks: bool = False) -> Layout:
    """Every auto of the spec resolved for this cluster and a job of `images` image tasks; SpecError if it cannot run.

    `source_tasks`: the image tasks come out of CPU tasks of their own (a user's Dataset, `raypose.annotate`),
    which run beside the pose actors.
    """
    resources = spec.resources
    blocks = max(1, math.ceil(images / resources.images_per_crop_task))
    gpus, device = accelerator(resources.gpus_per_pose_actor, spec.pose.device, cluster, "pose")
    on_cpu = device == "cpu"
    crop_in = resources.crop_in if resources.crop_in != "auto" else ("pose_actor" if on_cpu else "tasks")
    detector = (accelerator(resources.gpus_per_detector_actor, spec.boxes.detector.device, cluster, "boxes.detector")
                if detecting else None)
    detector_gpus = detector[0] * _largest(resources.detector_actors) if detector else 0.0
    # Video read tasks, like a detector or source tasks, need CPUs beside the pose actors' (two actors would
    # take both of a 2-CPU node and the read tasks never start).
    actors = resources.pose_actors or default_pose_actors(cluster, gpus, detector_gpus, crop_in, blocks,
                                                          detecting or source_tasks or spec.images.format == "video")
    threads = pose_threads(resources.threads_per_pose_actor, on_cpu, cluster, actors)
    batch_size = spec.pose.batch_size or (CPU_BATCH_SIZE if on_cpu else GPU_BATCH_SIZE)
    dtype = resolve_dtype(spec.pose.dtype, device, cluster, cpu_bf16=cluster.cpu_bf16)
    settings = PoseSettings(device=device, dtype=dtype, batch_size=batch_size,
                            threads=threads, flip_test=spec.pose.flip_test, compile=spec.pose.compile,
                            flip_uncertainty=flip_uncertainty(spec.pose.uncertainty, spec.pose.flip_test))
    layout = Layout(
        pose=settings,
        pose_pool=ActorPool.sized(actors, cpus=resources.cpus_per_pose_actor, gpus=gpus,
                                  calls=resources.pose_calls_per_actor or (1 if on_cpu else GPU_CALLS_PER_ACTOR)),
        crops=crop_placement(crop_in, CropOptions.from_spec(spec, routing), device, threads or 1, batch_size,
                             gpu_decoder=spec.images.gpu_decoder, boxes_per_call=resources.boxes_per_crop_task),
        images_per_task=resources.images_per_crop_task,
        boxes_per_task=resources.boxes_per_crop_task,
        cluster=cluster,
    )
    if detector is None:
        return layout
    gpus, device = detector
    # The detector stays float32 on any CPU: bfloat16 was measured for ViTPose only.
    return replace(
        layout, detector_device=device, detector_dtype=resolve_dtype(spec.boxes.detector.dtype, device, cluster),
        detector_pool=ActorPool.sized(resources.detector_actors, cpus=resources.cpus_per_detector_actor, gpus=gpus),
        detector_threads=max(1, int(resources.cpus_per_detector_actor)),
    )


def accelerator(gpus: float | None, device: str, cluster: ClusterShape, field: str) -> tuple[float, str]:
    """GPUs an actor asks for and the device it runs on: a GPU each when the cluster has them.

    `device: cuda` needs GPUs: in the cluster, or promised by `gpus_per_*_actor` (an autoscaling
    cluster adds GPU workers when actors ask for them).
    """
    section = "pose" if field == "pose" else "detector"
    gpus_field = f"resources.gpus_per_{section}_actor"
    if gpus is None:
        gpus = 1.0 if cluster.gpus and device != "cpu" else 0.0
        if device == "cuda" and not cluster.gpus:
            raise SpecError(
                f"{field}.device: cuda, but the Ray cluster has no GPU; use {field}.device: auto or cpu, or set "
                f"{gpus_field} if the cluster adds GPU workers when asked (autoscaling)"
            )
    if device == "cuda" and gpus == 0:
        raise SpecError(f"{gpus_field}: 0 with {field}.device: cuda; give each actor a GPU (or a share: 0.5)")
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    return gpus, device


def flip_uncertainty(asked: str, flip_test: bool) -> bool:
    """`pose.uncertainty` resolved: auto = the flip columns whenever the flip test runs the mirrored crops anyway."""
    return asked == "flip" or (asked == "auto" and flip_test)


def resolve_dtype(dtype: str, device: str, cluster: ClusterShape, cpu_bf16: bool = False) -> str:
    """`auto` -> bfloat16 on GPUs that have it, else float16; on a CPU bfloat16 when `cpu_bf16` (the CPUs
    run it natively and the model was measured in it), else float32."""
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "bfloat16" if cpu_bf16 else "float32"
    return "bfloat16" if gpus_have_bf16(cluster) else "float16"


def gpus_have_bf16(cluster: ClusterShape) -> bool:
    """Whether the cluster's GPUs run bfloat16: as the driver's own GPU says, else by their Ray accelerator type."""
    if cluster.bf16 is not None:
        return cluster.bf16
    return not (set(cluster.accelerators) & NO_BF16_GPUS)


def default_pose_actors(cluster: ClusterShape, gpus: float, detector_gpus: float, crop_in: str, blocks: int,
                        beside_other_work: bool) -> int:
    """Pose actors when the job leaves it out: the cluster's, across every node.

    On GPUs, one per GPU (what the detector's actors leave of them). On CPUs the forward takes
    every core it is given: two actors a node when they crop for themselves (one crops while
    the other runs forwards), one a node beside crop or read tasks, a detector or the tasks that
    make the image rows (`beside_other_work`), which need CPUs of their own; never more than
    there are blocks to give them.
    """
    if gpus > 0:
        return max(1, int((cluster.gpus - detector_gpus) // gpus))
    per_node = min(2, max(1, cluster.node_cpus)) if crop_in == "pose_actor" and not beside_other_work else 1
    return max(1, min(per_node * cluster.nodes, blocks))


def pose_threads(asked: int | None, on_cpu: bool, cluster: ClusterShape, actors: int | tuple[int, int]) -> int | None:
    """Torch threads of a CPU pose actor (None on a GPU): its node's cores shared among the actors a node holds.

    Ray's CPU count only paces the tasks; the forward is nearly all of a CPU job's work.
    """
    if not on_cpu:
        return None
    per_node = math.ceil(_largest(actors) / max(1, cluster.nodes))
    return asked or max(1, cluster.node_cpus // per_node)


def _largest(size: int | tuple[int, int]) -> int:
    return size if isinstance(size, int) else size[1]


def crop_placement(crop_in: str, options: CropOptions, device: str, threads: int, batch_size: int,
                   gpu_decoder: str, boxes_per_call: int) -> CropPlacement:
    """The crop strategy for `resources.crop_in` (resolved): its CPU tasks, the pose actors' cropper, its decoder."""
    regions = options.region_decode and not options.jpeg_draft and region_decoder_available()
    if crop_in == "tasks":
        task = (make_crops_in_parts, {"options": options, "boxes_per_part": boxes_per_call})
        return CropPlacement("tasks", task, CropColumn(), rows_per_call=batch_size, jpeg_regions=regions)
    if crop_in == "pose_actor":
        # An actor that crops for itself takes a crop task's block at a time.
        return CropPlacement("pose_actor", None, CpuCropper(options, threads=threads, boxes_per_call=boxes_per_call),
                             rows_per_call=None,
                             jpeg_regions=regions)
    decoder = device_decoder(gpu_decoder, device)
    # Tasks read the files and plan the crops; the actor decodes and cuts pose.batch_size crops a call.
    return CropPlacement("pose_device", (plan_crops, {"options": options}), DeviceCropper(options, decoder=decoder),
                         rows_per_call=batch_size, decoder=decoder.name, jpeg_regions=regions)


def device_decoder(asked: str, device: str) -> PillowDecoder:
    """`images.gpu_decoder` resolved for a pose device: auto = nvImageCodec, else nvJPEG, else Pillow (on a CPU)."""
    gpu_decoders = {decoder.name: decoder for decoder in (NvImageCodecDecoder(), NvjpegDecoder())}
    if asked == "auto":
        usable = [decoder for decoder in gpu_decoders.values() if device == "cuda" and decoder.missing() is None]
        return usable[0] if usable else PillowDecoder()
    if asked == "pillow":
        return PillowDecoder()
    if device != "cuda":
        raise SpecError(f"images.gpu_decoder: {asked} decodes on a GPU, but the pose actors run on {device}")
    missing = gpu_decoders[asked].missing()
    if missing:
        raise SpecError(f"images.gpu_decoder: {asked}, but {missing} is not installed (pip install 'raypose[gpu]')")
    return gpu_decoders[asked]
