"""How long does resuming a job that was 90% done take, relative to the full run?

Generates its own images and a checkpoint, runs the job in full (a fresh `raypose submit`
process, Ray start-up included), removes the commit of one shard in ten, as a job killed
at 90% would have left it, resumes, and prints both wall times and their ratio.

    python benchmarks/resume.py --images 200 --preset tiny
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raypose.testing.synthetic import make_checkpoint, make_coco_dataset


def submit(job: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "raypose.cli", "submit", str(job), "--quiet", *args], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--shards", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raypose-resume-"))
    make_coco_dataset(work, [(640, 480)] * args.images, persons_per_image=2)
    model = make_checkpoint(work / "model", preset=args.preset)
    job = work / "job.yaml"
    job.write_text(json.dumps({
        "name": "resume-bench",
        "images": {"path": str(work / "images")},
        "boxes": {"path": str(work / "boxes.json")},
        "pose": {"model": str(model)},
        "output": {"path": str(work / "out"), "images_per_shard": -(-args.images // args.shards)},
    }))
    full = submit(job)
    shards = json.loads((work / "out" / "_job.json").read_text())["num_shards"]
    marker = sorted((work / "out" / "_shards").glob("*.json"))[0]
    for path in json.loads(marker.read_text())["files"]:
        Path(path).unlink()
    marker.unlink()
    (work / "out" / "manifest.json").unlink()
    resumed = submit(job, "--resume")
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    print(f"{args.images} images, {shards} shards, preset {args.preset}")
    print(f"full run: {full:.1f} s; resume with 1 of {shards} shards left: {resumed:.1f} s; ratio {resumed / full:.2f}")
    print(f"resumed run: {manifest['shards']}, ray start {manifest['seconds']['ray_start']:.1f} s, "
          f"pipeline {manifest['seconds']['pipeline']:.1f} s")


if __name__ == "__main__":
    main()
