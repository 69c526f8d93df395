"""Does the plan grow with the job? A run's plan (`raypose submit` before Ray starts: the listing and the boxes
streamed in key order, each shard's tasks written to `_plan/`) timed and its peak memory read, at 1M, 10M and
30M images; then the same job again with `output.mode: append` over the committed output (every image already
labelled): what checking each image's input fingerprint against the committed shards costs.

For each size it writes a sorted manifest of N `s3://` image URLs (nothing is read from S3: the plan lists
the manifest and joins the boxes, it does not open images) and a Parquet box table with 3 boxes an image,
sorted by key, then plans the job in a fresh process and reads its wall time and peak RSS (the process's own
high-water mark). Between the two plans the first plan's shards are marked committed, as the writer would.

    python benchmarks/plan_scale.py --sizes 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import os
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

CHUNK = 1_000_000


def make_inputs(folder: Path, images: int, boxes_per_image: int = 3, shuffled: bool = False) -> tuple[Path, Path]:
    """A sorted manifest of `images` s3:// URLs and a Parquet table of their boxes (`boxes_per_image` each),
    written a million images at a time; with `shuffled`, the box table's millions in a random order and the
    rows of each shuffled (a table sorted by something else than the key)."""
    manifest = folder / f"images-{images}.txt"
    boxes = folder / f"boxes-{images}.parquet"
    rng = np.random.default_rng(0)
    writer = None
    starts = list(range(0, images, CHUNK))
    with manifest.open("w") as f:
        for start in (rng.permutation(starts) if shuffled else starts):
            keys = [f"images/{i // 1000:06d}/{i:09d}.jpg" for i in range(start, min(images, start + CHUNK))]
            f.write("".join(f"s3://bucket/{k}\n" for k in keys))  # (shuffled: sorted again below)
            n = len(keys) * boxes_per_image
            xy, wh = rng.uniform(0, 400, (n, 2)), rng.uniform(20, 200, (n, 2))
            table = pa.table({
                "image_key": pa.array(np.repeat(np.array([f"bucket/{k}" for k in keys], dtype=object), boxes_per_image)),
                "bbox": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([xy, wh], 1).reshape(-1)), 4),
                "score": pa.array(rng.uniform(0.3, 1.0, n).astype(np.float32)),
                "category": pa.array(["person"] * n),
            })
            if shuffled:
                table = table.take(rng.permutation(n))
            writer = writer or pq.ParquetWriter(boxes, table.schema)
            writer.write_table(table)
    writer.close()
    if shuffled:
        manifest.write_text("".join(sorted(manifest.read_text().splitlines(keepends=True))))
    return manifest, boxes


def plan_in_child(job: Path, commit: bool) -> dict:
    """Plan the job for a run in a fresh process: its wall seconds, peak RSS and counts."""
    done = subprocess.run([sys.executable, __file__, "--child", str(job), *(["--commit"] if commit else [])],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(job: str, commit: bool) -> None:
    """In the fresh process: plan the job to run (lease, listing, boxes, plan files), and report."""
    from raypose.config.spec import load_job_spec
    from raypose.output import resume
    from raypose.output.resume import LAYOUT, result_key
    from raypose.pipeline.plan import plan_job

    check = time_calls(resume, "input_fingerprints", resume.CommittedIndex, "lookup")
    started = time.perf_counter()
    plan = plan_job(load_job_spec(job), run=True)
    seconds = time.perf_counter() - started
    if commit:  # what the writer leaves of each shard once its rows are written, so the next plan finds them
        for shard, inputs in plan.shards.to_write.items():
            plan.store.write_json(f"_shards/{shard:05d}.json", {
                "shard": shard, "job_id": plan.job_id, "inputs": inputs.fingerprint, "first_key": inputs.first_key,
                "last_key": inputs.last_key, "plan": inputs.plan, "images": inputs.images, "instances": 0,
                "errors": 0, "errors_by_stage": {}, "files": []})
        plan.store.write_json("_job.json", {"layout": LAYOUT, "job_id": plan.job_id, "runs": [],
                                            "result_key": result_key(plan.spec, plan.models())})
    plan.close()
    peak = own_peak_rss_gib()
    c = plan.counts
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak, "images": c["images"], "kept": c["images_kept"],
                      "shards": len(plan.shards.to_write), "check_seconds": check}))


def own_peak_rss_gib() -> float:
    """This process's own peak RSS: VmHWM, the high-water mark of its address space. Not `ru_maxrss`: Linux
    carries the parent's peak into it across the fork and exec that started this process (Python's
    subprocess uses vfork), so a child of a large parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def time_calls(*owners_and_names) -> dict[str, float]:
    """Wrap each (owner, name) callable so its calls' wall seconds add up in the returned dict: the per-image
    check (fingerprints of the listed images, their lookup in the committed shards' plan files) inside a plan."""
    seconds: dict[str, float] = {}
    for owner, name in zip(owners_and_names[::2], owners_and_names[1::2]):
        wrapped = getattr(owner, name)

        def timed(*args, _wrapped=wrapped, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _wrapped(*args, **kwargs)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)
    return seconds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 30_000_000])
    parser.add_argument("--shuffled-boxes", action="store_true",
                        help="write the box table in a random order (the plan sorts it through spilled runs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--commit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.commit)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_checkpoint(folder / "model")
        for images in sorted(args.sizes):
            started = time.perf_counter()
            manifest, boxes = make_inputs(folder, images, shuffled=args.shuffled_boxes)
            os.sync()  # the inputs' write-back would otherwise run during the timed plan
            made = time.perf_counter() - started
            spec = {"images": {"path": str(manifest)}, "boxes": {"source": "table", "path": str(boxes)},
                    "pose": {"model": str(model)}, "output": {"path": str(folder / f"out-{images}")}}
            job = folder / f"job-{images}.yaml"
            job.write_text(json.dumps(spec))
            first = plan_in_child(job, commit=True)
            spec["output"]["mode"] = "append"
            job.write_text(json.dumps(spec))
            again = plan_in_child(job, commit=False)
            row = {"images": images, "boxes": 3 * images, "inputs_seconds": made, "plan": first, "append_nothing_new": again}
            rows.append(row)
            print(f"{images:>11,} images, {3 * images:>11,} boxes: plan {first['seconds']:6.1f} s, peak RSS "
                  f"{first['peak_rss_gib']:.2f} GiB, {first['shards']} shards; append with nothing new "
                  f"{again['seconds']:6.1f} s, {again['peak_rss_gib']:.2f} GiB, {again['kept']:,} kept, "
                  f"{again['images']} to label", flush=True)
            check = again["check_seconds"]
            print(f"{'':>11}  the append's per-image check: fingerprints {check.get('input_fingerprints', 0):.1f} s, "
                  f"lookups in the committed shards {check.get('lookup', 0):.1f} s", flush=True)
            for path in (manifest, boxes):
                path.unlink()
            subprocess.run(["rm", "-rf", str(folder / f"out-{images}")], check=True)
    return rows


if __name__ == "__main__":
    main()
