#!/usr/bin/env python
"""Where a pose-actor batch spends its time, and which kernels the forward pass runs.

    python benchmarks/profile_pose.py --preset vitpose-base --device cuda --dtype bfloat16 --batch-size 256

Builds a checkpoint of the preset's shape (random weights) and one pose-stage batch as the
crop stage makes it (uint8 crops in a binary Arrow column), then times, median of --repeat:

  crops -> array    the crop column -> one (N, H, W, 3) uint8 array (`arrow_views.crop_array`)
  estimate          `PoseEngine.estimate`: host->device copy, normalise, forward, decode, back
  forward           the model forward alone on ready device tensors (the ceiling's unit)
  estimate_rows     the whole `PoseStage.__call__` body: the above plus the output columns
  rows, no model    `estimate_rows` with an engine that answers at once: its own work alone
  host work         `estimate_rows` with the real engine but a stand-in model (zero heatmaps at once,
                    `synthetic.instant_heatmaps`): all the actor's work per batch but the forward
                    (crop array, copy to the device, normalise, decode the heatmaps, output rows);
                    printed as a fraction of the forward's time too
  4 in one call     `estimate_rows` on four batches in one call, per batch: on a GPU the next batch
                    is prepared while one runs, so this nears `forward` when the host keeps up

On a GPU it also prints the forward's ten most expensive kernels (torch.profiler) and, with
--compile, the forward under `torch.compile`. With --device-crops N it breaks down a block of N
benchmark JPEGs (`testing.synthetic.make_benchmark_dataset`) as resources.crop_in: pose_device runs it:

  plan_crops        the CPU stage (tasks): the files' bytes, headers, boxes and crop geometry
  planned_images    the pose actor finds each crop's image in the rows
  decode            `decode_device.decode_on_device` with the decoder a job's layout picks here
                    (`images.gpu_decoder: auto`: nvImageCodec on a GPU, else Pillow)
  cut_on_device     decode + every crop of the block cut on the device (one cut)

and how far those crops are from the CPU stage's (`make_crops`: Pillow decode, numpy cut):
bit-identical where the device decodes with Pillow too, the GPU decoder's rounding on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from raypose.config.spec import PoseSpec
from raypose.models.routing import resolve_routing
from raypose.models.vitpose import PoseEngine, inspect_model
from raypose.pipeline.arrow_views import crop_array
from raypose.pipeline.crop_stage import CropOptions
from raypose.pipeline.croppers import column_pixels
from raypose.pipeline.pose_stage import estimate_rows
from raypose.schema import CROP_SCHEMA
from raypose.testing.synthetic import instant_heatmaps, make_checkpoint


def crop_batch(n: int, size: tuple[int, int], seed: int = 0) -> pa.Table:
    """n crop rows as `crop_stage.make_crops` emits them (random pixels, plausible geometry)."""
    width, height = size
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    columns = {
        "image_key": [f"img{i // 4}" for i in range(n)], "image_uri": [f"/x/img{i // 4}.jpg" for i in range(n)],
        "image_width": [1280] * n, "image_height": [720] * n, "instance_index": [i % 4 for i in range(n)],
        "annotation_id": list(range(n)), "category": ["person"] * n, "box_score": [None] * n,
        "box_source": ["coco"] * n, "detector_id": [None] * n, "shard": [0] * n, "image_rows": [4] * n,
        "bbox": [[10.0, 20.0, 100.0, 200.0]] * n, "expert": ["coco"] * n,
        "center": [[60.0, 120.0]] * n, "scale": [[0.94, 1.25]] * n, "error_stage": [None] * n,
        "error_reason": [None] * n, "crop": [c.tobytes() for c in crops],
    }
    return pa.table({name: pa.array(columns.get(name, [None] * n), CROP_SCHEMA.field(name).type)
                     for name in CROP_SCHEMA.names})  # what images lack (video frames' columns) stays null


class NoModel:
    """A stand-in engine that answers at once with zeros."""

    def __init__(self, num_keypoints: int):
        self.num_keypoints = num_keypoints

    def submit(self, crops, centers, scales, **_) -> tuple[np.ndarray, np.ndarray]:
        n = len(crops)
        return np.zeros((n, self.num_keypoints, 2), np.float32), np.zeros((n, self.num_keypoints), np.float32)

    @staticmethod
    def collect(submitted):
        return submitted


def with_model(engine: PoseEngine, model, fn):
    """fn() with `engine.model` swapped for `model`."""
    real, engine.model = engine.model, model
    try:
        return fn()
    finally:
        engine.model = real


def timed(fn, repeat: int, device: torch.device) -> float:
    """Median seconds of fn() over `repeat` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vitpose-small")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the forward under torch.compile")
    p.add_argument("--device-crops", type=int, default=0, metavar="N",
                   help="also break down device crops on a block of N benchmark images")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / args.preset, preset=args.preset)
        routing = resolve_routing(PoseSpec(model=str(checkpoint)))
        device, dtype = resolved(args.device, args.dtype)
        started = time.perf_counter()
        engine = PoseEngine(inspect_model(str(checkpoint)), device=device, dtype=dtype)
        load_seconds = time.perf_counter() - started
        expert = routing.experts[routing.default]
        engines = {(expert.model.model_id, expert.model.revision): engine}
        device, n = engine.device, args.batch_size
        width, height = engine.info.input_size
        batch = crop_batch(n, (width, height))
        block = crop_batch(4 * n, (width, height), seed=1)
        column = batch.column("crop").combine_chunks()
        array = crop_array(column, list(range(n)), (width, height))
        centers = np.tile(np.float32([[60, 120]]), (n, 1))
        scales = np.tile(np.float32([[0.94, 1.25]]), (n, 1))
        pixels = torch.randn(n, 3, height, width, device=device).to(engine.dtype)

        @torch.inference_mode()
        def forward():
            engine.model(pixel_values=pixels)

        rows = {
            "crops -> array": timed(lambda: crop_array(column, list(range(n)), (width, height)), args.repeat, device),
            "estimate": timed(lambda: engine.estimate(array, centers, scales), args.repeat, device),
            "forward": timed(forward, args.repeat, device),
            "estimate_rows": timed(lambda: estimate_rows(engines, routing, batch, column_pixels(batch)), args.repeat,
                                   device),
            "rows, no model": timed(lambda: estimate_rows({key: NoModel(engine.info.num_keypoints) for key in engines},
                                                          routing, batch, column_pixels(batch)), args.repeat, device),
            "host work": timed(lambda: with_model(engine, instant_heatmaps(engine.info), lambda: estimate_rows(
                engines, routing, batch, column_pixels(batch))), args.repeat, device),
            # Per batch of a call of four: batch i+1 is prepared while batch i runs (`PoseEngine.submit`).
            "4 in one call": timed(lambda: estimate_rows(engines, routing, block, column_pixels(block), batch_size=n),
                                   args.repeat, device) / 4,
        }
        print(f"{args.preset} on {device} {str(engine.dtype).replace('torch.', '')}, batch {n}, "
              f"attention {engine.model.backbone.config._attn_implementation}, torch threads {torch.get_num_threads()}, "
              f"engine load {load_seconds:.1f} s (first in this process: CUDA context included)")
        for name, seconds in rows.items():
            print(f"  {name:16s} {seconds * 1e3:9.2f} ms  {n / seconds:10.1f} crops/s")
        print(f"  host work / forward: {rows['host work'] / rows['forward']:.2f}")
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                forward()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60))
        if args.compile:
            model = engine.model
            compiled = torch.compile(model)

            @torch.inference_mode()
            def compiled_forward():
                compiled(pixel_values=pixels)

            started = time.perf_counter()
            compiled_forward()  # the compile itself (later calls of this batch size reuse it)
            if device.type == "cuda":
                torch.cuda.synchronize()
            compile_seconds = time.perf_counter() - started
            seconds = timed(compiled_forward, args.repeat, device)
            print(f"  {'forward compiled':16s} {seconds * 1e3:9.2f} ms  {n / seconds:10.1f} crops/s  "
                  f"(compile {compile_seconds:.1f} s)")
            saved = rows["forward"] - seconds  # per batch of n crops
            if saved > 0:
                print(f"  compile pays for itself after {compile_seconds / saved * n:,.0f} crops "
                      f"(a 100k-crop job: {100_000 / n * saved - compile_seconds:+.1f} s)")
            else:
                print("  compile does not pay: the compiled forward is no faster")
        if args.device_crops:
            profile_device_crops(Path(tmp), args.device_crops, routing, device, args.repeat)


def benchmark_tasks(folder: Path, count: int, **dataset) -> pa.Table:
    """Image rows (`schema.IMAGE_TASK_SCHEMA`) for `count` benchmark JPEGs and their boxes, made under `folder`;
    `dataset`: `make_benchmark_dataset`'s sizes, persons, box_heights."""
    import json
    import os

    from raypose.schema import IMAGE_TASK_SCHEMA
    from raypose.testing.synthetic import make_benchmark_dataset

    _, boxes = make_benchmark_dataset(folder / "data", count, workers=os.cpu_count() or 1, **dataset)
    coco = json.loads(boxes.read_text())
    by_image: dict[int, list] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["bbox"])
    return pa.Table.from_pylist([
        {"image_key": image["file_name"], "image_uri": str(folder / "data" / image["file_name"]),
         "box_xywh": by_image[image["id"]], "annotation_id": list(range(len(by_image[image["id"]]))),
         "category": ["person"] * len(by_image[image["id"]]), "box_score": [None] * len(by_image[image["id"]]),
         "box_source": "gt"} for image in coco["images"]], schema=IMAGE_TASK_SCHEMA)


def resolved(device: str, dtype: str) -> tuple[str, str]:
    """--device and --dtype with auto resolved as a job's layout resolves it on this machine."""
    from raypose.pipeline.layout import ClusterShape, resolve_dtype
    from raypose.pipeline.runtime import cpu_has_native_bf16

    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if device == "auto" else device
    cluster = ClusterShape(bf16=torch.cuda.is_bf16_supported() if cuda else None)
    return device, resolve_dtype(dtype, device, cluster, cpu_bf16=cpu_has_native_bf16())


def profile_device_crops(folder: Path, count: int, routing, device: torch.device, repeat: int) -> None:
    """Time each step of resources.crop_in: pose_device on one block of `count` benchmark images."""
    from raypose.imaging.decode_device import decode_on_device
    from raypose.pipeline.crop_sources import planned_images
    from raypose.pipeline.crop_stage import plan_crops
    from raypose.pipeline.croppers import cut_on_device
    from raypose.pipeline.layout import device_decoder

    tasks = benchmark_tasks(folder, count)
    options = CropOptions(routing=routing)
    size = routing.input_size(routing.default)
    decoder = device_decoder("auto", device.type)

    def cut_all(rows, images, device):
        _, cut = cut_on_device(rows, images, device, options.max_pixels, decoder)
        return cut([row for image in images for row in image.rows], size)

    rows = plan_crops(tasks, options=options)
    images = planned_images(rows)
    crops = sum(len(image.rows) for image in images)
    steps = {
        "plan_crops": timed(lambda: plan_crops(tasks, options=options), repeat, device),
        "planned_images": timed(lambda: planned_images(rows), repeat, device),
        "decode": timed(lambda: decode_on_device(images, device, options.max_pixels, decoder), repeat, device),
        "cut_on_device": timed(lambda: cut_all(rows, images, device), repeat, device),
    }
    print(f"device crops: {count} images ({', '.join(sorted({k.split('_')[-1][:-4] for k in tasks.column('image_key').to_pylist()}))}), "
          f"{crops} crops, decoded by {decoder.name}")
    for name, seconds in steps.items():
        print(f"  {name:17s} {seconds * 1e3:9.2f} ms  {count / seconds:8.1f} images/s  {crops / seconds:9.1f} crops/s")
    # The same crops from the CPU stage (Pillow decode, numpy cut): how far the device's are.
    from raypose.pipeline.crop_stage import make_crops

    reference = make_crops(tasks, options=options)
    table, cut = cut_on_device(rows, images, device, options.max_pixels, decoder)
    good = [i for i, stage in enumerate(table.column("error_stage").to_pylist()) if stage is None]
    width, height = size
    ours = cut(good, (width, height)).cpu().numpy().astype(np.int16)
    theirs = np.stack([np.frombuffer(reference.column("crop")[i].as_py(), np.uint8).reshape(height, width, 3)
                       for i in good]).astype(np.int16)
    difference = np.abs(ours - theirs)
    print(f"  vs the CPU stage's crops: mean |diff| {difference.mean():.3f} grey levels, p99 "
          f"{np.percentile(difference, 99):.0f}, max {difference.max()}, {np.mean(difference == 0):.1%} equal")


if __name__ == "__main__":
    main()
