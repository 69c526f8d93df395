"""A bucket that grows, labelled with `output.mode: append` through the CLI, as a nightly job would.

The first run labels `--images` drawn images (`--per-shard` a shard); then `--new` more arrive, half
with keys between the old ones and half after every old key; an append run labels them; a third run
finds nothing new. Prints each run's exit code, seconds and summary line, whether the first run's part
files are byte-identical afterwards, and whether every instance is in the table exactly once.

    python benchmarks/growing_bucket.py --images 60 --new 20 --per-shard 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from raypose.testing.synthetic import make_checkpoint, make_coco_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--new", type=int, default=20, help="images that arrive (an even number)")
    parser.add_argument("--per-shard", type=int, default=10)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return trial(Path(args.out or tmp), args.images, args.new, args.per_shard)


def trial(root: Path, images: int, new: int, per_shard: int) -> dict:
    total = images + new
    drawn = root / "drawn"
    make_coco_dataset(drawn, [(160 + 2 * i, 120 + i) for i in range(total)],
                      persons_per_image=[1 + i % 2 for i in range(total)], seed=5)
    model = make_checkpoint(root / "model")
    folder, out = root / "images", root / "out"
    coco = json.loads((drawn / "boxes.json").read_text())
    between = list(range(1, new, 2))  # odd indexes among the first images: keys between old keys
    after = list(range(images + len(between), total))  # keys after every old key
    old = [i for i in range(images + len(between)) if i not in between]
    job = root / "job.yaml"
    job.write_text(json.dumps({
        "images": {"path": str(folder)}, "boxes": {"source": "coco", "path": str(root / "boxes.json")},
        "pose": {"model": str(model), "dtype": "float32"},
        "output": {"path": str(out), "images_per_shard": per_shard, "mode": "append"}}))

    arrive(drawn, folder, root / "boxes.json", coco, old)
    results = {"first": submit(job)}
    before = part_hashes(out)
    arrive(drawn, folder, root / "boxes.json", coco, between + after)
    results["append"] = submit(job)
    after_hashes = part_hashes(out)
    table = pq.read_table(out / "keypoints", columns=["image_key", "instance_index"])
    pairs = list(zip(table.column("image_key").to_pylist(), table.column("instance_index").to_pylist()))
    results["nothing_new"] = submit(job)
    manifest = json.loads((out / "manifest.json").read_text())
    report = {
        **results,
        "first_run_files": len(before),
        "first_run_files_identical": all(after_hashes.get(name) == digest for name, digest in before.items()),
        "rows": len(pairs), "distinct_instances": len(set(pairs)), "instances_expected": sum(1 + i % 2 for i in range(total)),
        "shards": manifest["shards"], "runs": manifest["runs"],
        "files_unchanged_by_the_third_run": part_hashes(out) == after_hashes,
    }
    print(json.dumps(report, indent=2))
    return report


def arrive(drawn: Path, folder: Path, boxes: Path, coco: dict, indexes: list[int]) -> None:
    """Images arrive in the folder; the boxes file lists the ones there."""
    folder.mkdir(exist_ok=True)
    for i in indexes:
        (folder / f"img_{i:04d}.jpg").write_bytes((drawn / "images" / f"img_{i:04d}.jpg").read_bytes())
    present = {im["id"] for im in coco["images"] if (folder / im["file_name"]).exists()}
    boxes.write_text(json.dumps({**coco, "images": [im for im in coco["images"] if im["id"] in present],
                                 "annotations": [a for a in coco["annotations"] if a["image_id"] in present]}))


def submit(job: Path) -> dict:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "raypose.cli", "submit", str(job)], capture_output=True, text=True)
    lines = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()
    return {"exit": done.returncode, "seconds": round(time.monotonic() - started, 1), "line": lines[-1] if lines else ""}


def part_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "keypoints").iterdir()}


if __name__ == "__main__":
    main()
