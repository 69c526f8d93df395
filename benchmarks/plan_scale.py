"""Does the plan grow with the job? `raypose validate`'s time and peak memory at 100k, 1M and 10M images.

For each size it writes a manifest of N `s3://` image URLs (nothing is read from S3: the
plan lists the manifest and joins the boxes, it does not open images) and a Parquet box table
with 3 boxes an image, then runs `raypose validate` on them in a fresh process and reads its
wall time and peak RSS (the process's own high-water mark).

    python benchmarks/plan_scale.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from raypose.testing.synthetic import make_checkpoint  # noqa: E402


def make_inputs(folder: Path, images: int, boxes_per_image: int = 3) -> tuple[Path, Path]:
    """A manifest of `images` s3:// URLs and a Parquet table of their boxes (`boxes_per_image` each)."""
    keys = pa.array([f"images/{i // 1000:05d}/{i:09d}.jpg" for i in range(images)])
    manifest = folder / f"images-{images}.txt"
    with manifest.open("w") as f:
        for start in range(0, images, 1_000_000):
            f.write("".join(f"s3://bucket/{k}\n" for k in keys.slice(start, 1_000_000).to_pylist()))
    rng = np.random.default_rng(0)
    n = images * boxes_per_image
    xy = rng.uniform(0, 400, (n, 2))
    wh = rng.uniform(20, 200, (n, 2))
    table = pa.table({
        "image_key": pa.array(np.repeat(np.array([f"bucket/{k}" for k in keys.to_pylist()], dtype=object),
                                        boxes_per_image)),
        "bbox": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([xy, wh], 1).reshape(-1)), 4),
        "score": pa.array(rng.uniform(0.3, 1.0, n).astype(np.float32)),
        "category": pa.array(["person"] * n),
    })
    boxes = folder / f"boxes-{images}.parquet"
    pq.write_table(table, boxes)
    return manifest, boxes


def validate(job: Path) -> dict:
    """`raypose validate JOB` in a fresh process: wall seconds and the child's peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raypose.cli", "validate", str(job)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: the largest child so far
    return {"seconds": seconds, "peak_rss_gib": max(peak, before) / 2**20, "output": done.stdout.strip()[:200]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_checkpoint(folder / "model")
        # Smallest first: RUSAGE_CHILDREN keeps the largest child's peak, so each size's peak is its own.
        for images in sorted(args.sizes):
            started = time.perf_counter()
            manifest, boxes = make_inputs(folder, images)
            os.sync()  # the inputs' write-back would otherwise run during the timed validate
            made = time.perf_counter() - started
            job = folder / f"job-{images}.yaml"
            job.write_text(json.dumps({
                "images": {"path": str(manifest)}, "boxes": {"source": "table", "path": str(boxes)},
                "pose": {"model": str(model)}, "output": {"path": str(folder / f"out-{images}")},
            }))
            row = {"images": images, "boxes": 3 * images, "inputs_seconds": made, **validate(job)}
            rows.append(row)
            print(f"{images:>11,} images, {3 * images:>11,} boxes: validate {row['seconds']:6.1f} s, "
                  f"peak RSS {row['peak_rss_gib']:.2f} GiB")
            for path in (manifest, boxes):
                path.unlink()
    if len(rows) > 1:
        print(f"RSS ratio {rows[1]['images']:,} / {rows[0]['images']:,}: {rows[1]['peak_rss_gib'] / rows[0]['peak_rss_gib']:.2f}")
    return rows


if __name__ == "__main__":
    main()
