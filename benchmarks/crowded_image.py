"""Memory per process for one image with thousands of boxes (`resources.boxes_per_crop_task`).

Draws one 640x480 JPEG with `--boxes` person boxes (COCO JSON) and a checkpoint, runs
`raypose submit` in a fresh process, and samples every process of its tree (the driver, Ray's
own, every worker) from /proc twice a second: prints each process's peak resident memory
(VmHWM), the tree's largest sum of RSS, the seconds the job took, and whether it wrote every row.

    python benchmarks/crowded_image.py --boxes 50000 --crop-in pose_actor
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from raypose.testing.synthetic import draw_people, make_checkpoint  # noqa: E402


def crowded_job(folder: Path, boxes: int, model: Path, crop_in: str, per_task: int | None) -> Path:
    """One 640x480 JPEG with `boxes` boxes, its COCO JSON and the job YAML; returns the YAML's path."""
    rng = np.random.default_rng(0)
    wh = rng.uniform(30, 200, (boxes, 2))
    xy = rng.uniform(0, 1, (boxes, 2)) * (np.array([640, 480]) - wh)
    xywh = np.concatenate([xy, wh], axis=1).round(1)
    (folder / "images").mkdir(parents=True)
    draw_people(640, 480, xywh[:40]).save(folder / "images" / "crowd.jpg", quality=90)
    coco = {"images": [{"id": 1, "file_name": "crowd.jpg", "width": 640, "height": 480}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": box, "area": box[2] * box[3],
                             "iscrowd": 0} for i, box in enumerate(xywh.tolist())],
            "categories": [{"id": 1, "name": "person"}]}
    (folder / "boxes.json").write_text(json.dumps(coco))
    spec = {"name": "crowded", "images": {"path": str(folder / "images")},
            "boxes": {"source": "coco", "path": str(folder / "boxes.json")},
            "pose": {"model": str(model), "dtype": "float32"},
            "resources": {"crop_in": crop_in}, "output": {"path": str(folder / "out")}}
    if per_task:
        spec["resources"]["boxes_per_crop_task"] = per_task
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return folder / "job.yaml"


def tree(root: int) -> list[int]:
    """`root` and every process descended from it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def memory(pid: int) -> tuple[str, int, int] | None:
    """A process's name (its command line, short), resident KiB now and at its peak."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    kib = lambda key: int(status.get(key, "0 kB").split()[0])  # noqa: E731
    return name[:90] or status["Name"].strip(), kib("VmRSS"), kib("VmHWM")


def watch(root: int, peaks: dict, totals: list, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        total = 0
        for pid in tree(root):
            found = memory(pid)
            if found:
                name, rss, hwm = found
                total += rss
                peaks[pid] = (name, max(hwm, peaks.get(pid, ("", 0))[1]))
        totals.append(total)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=50_000)
    parser.add_argument("--preset", default="tiny", help="raypose.testing.synthetic.make_checkpoint preset")
    parser.add_argument("--crop-in", default="pose_actor", choices=["tasks", "pose_actor", "pose_device"])
    parser.add_argument("--boxes-per-task", type=int, default=None, help="resources.boxes_per_crop_task (default: the spec's)")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_checkpoint(folder / "model", preset=args.preset)
        job = crowded_job(folder / "job", args.boxes, model, args.crop_in, args.boxes_per_task)
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "raypose.cli", "submit", str(job)], start_new_session=True)
        peaks, totals, stop = {}, [], threading.Event()
        watcher = threading.Thread(target=watch, args=(process.pid, peaks, totals, stop), daemon=True)
        watcher.start()
        code = process.wait(timeout=args.timeout)
        seconds = time.perf_counter() - started
        stop.set()
        watcher.join()
        manifest = json.loads((folder / "job" / "out" / "manifest.json").read_text()) if code == 0 else {}
    largest = sorted(peaks.values(), key=lambda p: -p[1])
    result = {"boxes": args.boxes, "crop_in": args.crop_in, "exit": code, "seconds": round(seconds, 1),
              "instances": manifest.get("counts", {}).get("instances"), "errors": manifest.get("counts", {}).get("errors"),
              "largest_process_gib": round(largest[0][1] / 2**20, 2) if largest else None,
              "tree_peak_gib": round(max(totals, default=0) / 2**20, 2)}
    print(json.dumps(result))
    for name, kib in largest[:6]:
        print(f"  {kib / 2**20:6.2f} GiB  {name}")
    return result


if __name__ == "__main__":
    main()
