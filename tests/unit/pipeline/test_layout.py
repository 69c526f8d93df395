"""The layout: every auto of a spec resolved once for a cluster, and what the cluster cannot give refused."""

from __future__ import annotations

import pytest
from helpers import routing_for

from raypose.config.spec import parse_job_spec
from raypose.errors import SpecError
from raypose.imaging.decode_device import (
    NvImageCodecDecoder,
    NvjpegDecoder,
    PillowDecoder,
)
from raypose.pipeline.crop_stage import make_crops_in_parts, plan_crops
from raypose.pipeline.croppers import CpuCropper, CropColumn, DeviceCropper
from raypose.pipeline.layout import ClusterShape, resolve_layout

ROUTING = routing_for({"coco": (192, 256)})
CPU = ClusterShape(gpus=0, node_cpus=2)
GPU = ClusterShape(gpus=4, node_cpus=16, accelerators=("H100",))


def layout(cluster: ClusterShape = CPU, images: int = 128, detecting: bool = False, gpu_decoder: str = "auto",
           **sections):
    raw = {"images": {"path": "/data", "gpu_decoder": gpu_decoder}, "boxes": {"path": "/boxes.json"},
           "pose": {"model": "/model"}, "output": {"path": "/out"}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return resolve_layout(parse_job_spec(raw), ROUTING, cluster, images, detecting=detecting)


def pose_layout(result) -> tuple[str, int, int | None]:
    return result.crops.name, result.pose_pool.max_actors, result.pose.threads


def test_cpu_jobs_get_two_actors_that_crop_for_themselves_and_share_the_cores():
    assert pose_layout(layout(CPU)) == ("pose_actor", 2, 1)
    assert pose_layout(layout(ClusterShape(node_cpus=16))) == ("pose_actor", 2, 8)
    assert pose_layout(layout(ClusterShape(node_cpus=1))) == ("pose_actor", 1, 1)
    assert pose_layout(layout(CPU, images=16)) == ("pose_actor", 1, 2)  # one block, one actor
    # Crop or read tasks, or a detector, need a CPU beside the actor: one actor.
    assert pose_layout(layout(CPU, resources={"crop_in": "tasks"})) == ("tasks", 1, 2)
    assert pose_layout(layout(CPU, resources={"crop_in": "pose_device"})) == ("pose_device", 1, 2)
    assert pose_layout(layout(CPU, detecting=True)) == ("pose_actor", 1, 2)
    video = parse_job_spec({"images": {"path": "/data", "format": "video"}, "boxes": {"source": "detector"},
                            "pose": {"model": "/model"}, "output": {"path": "/out"}})
    assert pose_layout(resolve_layout(video, ROUTING, CPU, 128)) == ("pose_actor", 1, 2)  # video read tasks
    # What the job names, it gets.
    named = layout(ClusterShape(node_cpus=16), images=16, resources={"pose_actors": 3, "threads_per_pose_actor": 4})
    assert pose_layout(named) == ("pose_actor", 3, 4)
    assert pose_layout(layout(ClusterShape(node_cpus=16), resources={"pose_actors": 3})) == ("pose_actor", 3, 5)


def test_cpu_defaults_device_dtype_and_batch():
    result = layout(CPU)
    assert (result.pose.device, result.pose.dtype, result.pose.batch_size, result.pose_pool.gpus) == ("cpu", "float32", 8, 0)
    assert result.crops.decoder == "pillow" and result.crops.jpeg_regions  # Pillow's pixels, JPEGs decoded in part
    pillow_only = parse_job_spec({"images": {"path": "/data", "region_decode": False}, "boxes": {"path": "/b.json"},
                                  "pose": {"model": "/model"}, "output": {"path": "/out"}})
    assert not resolve_layout(pillow_only, ROUTING, CPU, 128).crops.jpeg_regions
    # CPUs with native bfloat16 (AVX512-BF16, AMX) run it; only this machine's flags are known.
    assert layout(ClusterShape(node_cpus=2, cpu_bf16=True)).pose.dtype == "bfloat16"
    assert layout(ClusterShape(node_cpus=2, cpu_bf16=True), pose={"dtype": "float32"}).pose.dtype == "float32"


def test_gpu_jobs_get_an_actor_per_gpu_crop_tasks_and_bfloat16():
    result = layout(GPU)
    assert pose_layout(result) == ("tasks", 4, None)  # every GPU of the cluster
    assert layout(GPU, resources={"gpus_per_pose_actor": 0.5}).pose_pool.max_actors == 8
    # A detector's actors take their GPUs first.
    assert layout(GPU, detecting=True, resources={"detector_actors": 2}).pose_pool.max_actors == 2
    assert (result.pose.device, result.pose.dtype, result.pose.batch_size, result.pose_pool.gpus) == (
        "cuda", "bfloat16", 256, 1.0)
    older = layout(ClusterShape(gpus=1, node_cpus=8, accelerators=("V100",)))
    assert older.pose.dtype == "float16"  # no bfloat16 before compute capability 8.0
    assert layout(GPU, pose={"device": "cpu"}).pose.device == "cpu"


def test_cpu_jobs_use_every_node():
    two_nodes = ClusterShape(node_cpus=1, nodes=2)
    assert pose_layout(layout(two_nodes)) == ("pose_actor", 2, 1)
    assert pose_layout(layout(ClusterShape(node_cpus=8, nodes=3))) == ("pose_actor", 6, 4)
    assert pose_layout(layout(ClusterShape(node_cpus=8, nodes=3), resources={"crop_in": "tasks"})) == ("tasks", 3, 8)


def test_an_autoscaling_pool_is_min_to_max_actors():
    result = layout(GPU, resources={"pose_actors": [1, 8]})
    assert (result.pose_pool.min_actors, result.pose_pool.max_actors, result.pose_pool.autoscales) == (1, 8, True)
    assert not layout(GPU).pose_pool.autoscales
    pool = layout(CPU, detecting=True, resources={"detector_actors": [1, 3]}).detector_pool
    assert (pool.min_actors, pool.max_actors) == (1, 3)
    # CPU threads are shared among the most actors a node may hold.
    assert layout(ClusterShape(node_cpus=8, nodes=2), resources={"pose_actors": [2, 4]}).pose.threads == 4


def test_each_crop_placement_is_a_strategy_object():
    tasks, in_actor, on_device = (layout(CPU, resources={"crop_in": name}).crops
                                  for name in ("tasks", "pose_actor", "pose_device"))
    assert tasks.task[0] is make_crops_in_parts and isinstance(tasks.cropper, CropColumn) and tasks.rows_per_call == 8
    assert in_actor.task is None and isinstance(in_actor.cropper, CpuCropper) and in_actor.rows_per_call is None
    assert in_actor.cropper.threads == 1
    assert on_device.task[0] is plan_crops and isinstance(on_device.cropper, DeviceCropper)
    assert on_device.rows_per_call == 8 and type(on_device.cropper.decoder) is PillowDecoder  # on a CPU
    assert on_device.decoder == "pillow"
    assert on_device.jpeg_regions == tasks.jpeg_regions == in_actor.jpeg_regions  # regions decoded alone, each way


def test_the_gpu_decoder_is_an_object_chosen_once(monkeypatch):
    def device(gpu_decoder: str = "auto"):
        return layout(GPU, gpu_decoder=gpu_decoder, resources={"crop_in": "pose_device"}).crops

    installed = {"nvimgcodec": None, "nvjpeg": None}
    monkeypatch.setattr(NvImageCodecDecoder, "missing", lambda self: installed["nvimgcodec"])
    monkeypatch.setattr(NvjpegDecoder, "missing", lambda self: installed["nvjpeg"])
    chosen = device()
    assert isinstance(chosen.cropper.decoder, NvImageCodecDecoder) and chosen.decoder == "nvimgcodec"
    assert chosen.cropper.decoder.backends == ("HW_GPU_ONLY", "HYBRID_CPU_GPU", "GPU_ONLY")
    installed["nvimgcodec"] = "nvidia-nvjpeg-cu12"
    assert device().decoder == "nvjpeg"
    installed["nvjpeg"] = "torchvision"
    assert device().decoder == "pillow"
    assert device(gpu_decoder="pillow").decoder == "pillow"
    with pytest.raises(SpecError, match=r"images.gpu_decoder: nvimgcodec, but nvidia-nvjpeg-cu12 is not installed"):
        device(gpu_decoder="nvimgcodec")
    installed["nvjpeg"] = None
    with pytest.raises(SpecError, match=r"images.gpu_decoder: nvjpeg decodes on a GPU, but the pose actors run on cpu"):
        layout(CPU, gpu_decoder="nvjpeg", resources={"crop_in": "pose_device"})
    assert layout(CPU, resources={"crop_in": "pose_device"}).crops.decoder == "pillow"  # auto on a CPU


def test_cuda_on_a_cluster_without_gpus_is_a_spec_error_before_any_actor_starts():
    with pytest.raises(SpecError, match=r"pose.device: cuda, but the Ray cluster has no GPU"):
        layout(CPU, pose={"device": "cuda"})
    with pytest.raises(SpecError, match=r"boxes.detector.device: cuda, but the Ray cluster has no GPU"):
        layout(CPU, detecting=True, boxes={"source": "detector", "path": None, "detector": {"device": "cuda"}})
    with pytest.raises(SpecError, match=r"resources.gpus_per_pose_actor: 0 with pose.device: cuda"):
        layout(GPU, pose={"device": "cuda"}, resources={"gpus_per_pose_actor": 0})
    # An autoscaling cluster adds GPU workers when asked: a job that asks for them is trusted.
    promised = layout(CPU, pose={"device": "cuda"}, resources={"gpus_per_pose_actor": 1})
    assert (promised.pose.device, promised.pose_pool.gpus) == ("cuda", 1)


def test_the_detector_is_laid_out_beside_the_pose_actors():
    result = layout(GPU, detecting=True, resources={"detector_actors": 2, "cpus_per_detector_actor": 3})
    assert (result.detector_device, result.detector_dtype, result.detector_threads) == ("cuda", "bfloat16", 3)
    assert (result.detector_pool.max_actors, result.detector_pool.gpus) == (2, 1.0)
    assert layout(CPU).detector_pool is None
    described = result.describe()
    assert described["detector"]["max_actors"] == 2 and described["pose"]["device"] == "cuda"
    assert described["crop_in"] == "tasks" and described["decoder"] == "pillow"


def test_gpu_actors_run_two_calls_at_once_so_one_forward_is_queued_behind_another():
    assert layout(GPU).pose_pool.calls == 2 and layout(CPU).pose_pool.calls == 1
    assert layout(GPU, resources={"pose_calls_per_actor": 1}).pose_pool.calls == 1
    assert layout(CPU, resources={"pose_calls_per_actor": 3}).pose_pool.calls == 3


@pytest.mark.parametrize("uncertainty, flip_test, on", [
    ("auto", False, False), ("auto", True, True), ("none", True, False), ("flip", False, True), ("flip", True, True),
])
def test_the_flip_uncertainty_is_on_whenever_the_flip_test_runs_unless_turned_off(uncertainty, flip_test, on):
    result = layout(pose={"uncertainty": uncertainty, "flip_test": flip_test})
    assert result.pose.flip_uncertainty is on and result.pose.flip_test is flip_test


def test_an_unknown_uncertainty_names_the_field_and_the_choices():
    with pytest.raises(SpecError, match=r"pose\.uncertainty.*'auto', 'none' or 'flip'"):
        layout(pose={"uncertainty": "ensemble"})
