"""How many keypoint rows per second can the writer take: one write task, and the driver?

The write tasks (`writer.write_parts`, after the pose stage) write the rows as Parquet parts;
only their summaries reach the driver, whose `ShardWriter.take` counts images and commits
shards (moves the parts, writes the markers). This feeds a synthetic stream of pose-stage rows
(17 COCO keypoints, batches as the pose stage emits them, images in key order) through both, with
no Ray and no model, and prints rows/s of each: a write task's rate (they run in parallel, one
per block) and the driver's ceiling, to compare with what a cluster's GPUs produce (about 8,000
crops/s per GPU for ViTPose-B bf16).

    python benchmarks/writer_ceiling.py --rows 400000 --batch 256 --images-per-shard 10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from raypose.config.spec import OutputSpec  # noqa: E402
from raypose.imaging.keypoint_schemas import COCO17  # noqa: E402
from raypose.output.writer import OutputStore, PartTarget, ShardInputs, ShardWriter, write_parts  # noqa: E402
from raypose.schema import POSE_OUTPUT_SCHEMA  # noqa: E402


def pose_batches(rows: int, batch: int, per_image: int, images_per_shard: int, keypoints: int = 17):
    """Pose-stage batches of `batch` rows, `per_image` instances an image, images in key order."""
    rng = np.random.default_rng(0)
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        index = np.arange(start, start + n)
        image = index // per_image
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * keypoints)
        values = [pa.array(rng.random(n * keypoints, dtype=np.float32)) for _ in range(3)]
        columns = {
            "image_key": pa.array([f"images/{i:09d}.jpg" for i in image]),
            "image_uri": pa.array([f"s3://bucket/images/{i:09d}.jpg" for i in image]),
            "image_width": pa.array(np.full(n, 640, np.int32)), "image_height": pa.array(np.full(n, 480, np.int32)),
            "instance_index": pa.array((index % per_image).astype(np.int32)),
            "annotation_id": pa.array(index.astype(np.int64)), "category": pa.array(["person"] * n),
            "bbox": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 4, dtype=np.float32) * 100), 4),
            "box_score": pa.nulls(n, pa.float32()), "box_source": pa.array(["gt"] * n),
            "detector_id": pa.nulls(n, pa.string()), "expert": pa.array(["coco"] * n),
            "keypoint_schema": pa.array(["coco17"] * n),
            **{name: pa.ListArray.from_arrays(offsets, v) for name, v in zip(("keypoint_x", "keypoint_y", "keypoint_score"), values)},
            "instance_score": pa.array(rng.random(n, dtype=np.float32)),
            "error_stage": pa.nulls(n, pa.string()), "error_reason": pa.nulls(n, pa.string()),
            "shard": pa.array((image // images_per_shard).astype(np.int32)),
            "image_rows": pa.array(np.full(n, per_image, np.int32)), "pose_worker": pa.array(["node:1"] * n),
        }
        yield pa.table(columns, schema=POSE_OUTPUT_SCHEMA)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=256, help="rows per batch, as the pose stage emits them")
    parser.add_argument("--per-image", type=int, default=4, help="instances per image")
    parser.add_argument("--images-per-shard", type=int, default=10_000)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    images = -(-args.rows // args.per_image)
    shards = -(-images // args.images_per_shard)
    batches = list(pose_batches(args.rows, args.batch, args.per_image, args.images_per_shard))
    with tempfile.TemporaryDirectory() as tmp:
        store = OutputStore(OutputSpec(path=args.out or str(Path(tmp) / "out")), {})
        inputs = {s: ShardInputs(min(args.images_per_shard, images - s * args.images_per_shard), f"fp{s}")
                  for s in range(shards)}
        target = PartTarget(output=store.output, storage_options={}, job_id="bench", models={"coco": ("m", "r")},
                            schemas={"coco17": COCO17.describe()})
        writer = ShardWriter(store, target, shards=inputs)
        started = time.perf_counter()
        summaries = [write_parts(batch, target=target) for batch in batches]
        written = time.perf_counter() - started
        started = time.perf_counter()
        for summary in summaries:
            writer.take(summary)
        writer.close()
        committed = time.perf_counter() - started
    result = {"rows": args.rows, "batch": args.batch, "shards": shards, "write_seconds": written,
              "write_rows_per_second": args.rows / written, "driver_seconds": committed,
              "driver_rows_per_second": args.rows / committed}
    print(f"{args.rows} rows ({images} images, {shards} shards) in batches of {args.batch} (no Ray, no model):")
    print(f"  one write task:  {written:6.2f} s, {result['write_rows_per_second']:>12,.0f} rows/s (tasks run in parallel)")
    print(f"  the driver:      {committed:6.2f} s, {result['driver_rows_per_second']:>12,.0f} rows/s (summaries and commits)")
    return result


if __name__ == "__main__":
    main()
