#!/usr/bin/env python
"""CPU time of the crop stage per crop, JPEG regions (`images.region_decode`, the default) vs Pillow's whole decode.

    python benchmarks/crop_cost.py --images 60                    # the throughput benchmark's mix
    python benchmarks/crop_cost.py --images 60 --workload coco    # 640x480 photos

`make_crops` on one block of benchmark images (`testing.synthetic.make_benchmark_dataset`, the
files already read), in this process, one thread: CPU seconds per crop, best of --repeat, for
each decode path; then checks that both gave the same rows and the same crop bytes. This is
the stage a GPU host runs on its CPUs for every crop (`resources.crop_in: tasks`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from raypose.config.spec import PoseSpec
from raypose.inputs.fetch import read_images
from raypose.models.routing import resolve_routing
from raypose.pipeline.crop_stage import CropOptions, make_crops
from raypose.testing.synthetic import make_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_pose import benchmark_tasks  # noqa: E402

WORKLOADS = {"mixed": ((640, 480), (1280, 720), (4000, 3000)), "coco": ((640, 480),)}


def cpu_seconds(batch: pa.Table, options: CropOptions, repeat: int) -> tuple[float, pa.Table]:
    make_crops(batch.slice(0, 2), options=options)  # warm: imports, the decoder's start
    best, out = float("inf"), None
    for _ in range(repeat):
        started = time.process_time()
        out = make_crops(batch, options=options)
        best = min(best, time.process_time() - started)
    return best, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=60)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="mixed")
    p.add_argument("--box-heights", default="0.3-0.8", help="person height as a fraction of image height, MIN-MAX")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench-out", help="work folder (the images are cached there)")
    args = p.parse_args(argv)
    sizes = WORKLOADS[args.workload]
    heights = tuple(float(v) for v in args.box_heights.split("-"))
    folder = Path(args.out) / ("crop-cost-" + "_".join(f"{w}x{h}" for w, h in sizes) + f"-h{args.box_heights}")
    batch = read_images(benchmark_tasks(folder, args.images, sizes=sizes, box_heights=heights), storage_options={})
    checkpoint = Path(args.out) / "checkpoints" / "vitpose-small-seed0"  # throughput.py's; only its config is read
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, preset="vitpose-small")
    routing = resolve_routing(PoseSpec(model=str(checkpoint)))
    results = {}
    for name, region in (("jpeg regions", True), ("pillow", False)):
        options = CropOptions(routing=routing, max_pixels=10**9, region_decode=region)
        results[name] = cpu_seconds(batch, options, args.repeat)
    crops = results["pillow"][1].num_rows - results["pillow"][1].column("crop").null_count
    print(f"crop stage, {args.images} images ({args.workload}, people {args.box_heights} of the height), {crops} crops, "
          f"one thread, best of {args.repeat}:")
    for name, (seconds, _) in results.items():
        print(f"  {name:13s} {seconds * 1e3 / crops:7.2f} CPU-ms per crop  ({seconds:.2f} s)")
    print(f"  ratio        {results['pillow'][0] / results['jpeg regions'][0]:7.2f}x less CPU with regions")
    identical = results["jpeg regions"][1].equals(results["pillow"][1])
    print(f"  identical rows and crops: {identical}")
    if not identical:
        raise SystemExit("the two decode paths gave different crops")


if __name__ == "__main__":
    main()
