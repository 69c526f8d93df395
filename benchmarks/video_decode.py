"""Video in: how fast the read stage turns a video's frames into images, and a video job against the same frames as JPEGs.

Draws a 1080p H.264 video (people walking on a grainy background, 8 Mbit/s; x264's defaults otherwise: a keyframe
every 250 frames), then:

1. indexes it as the plan does (packets only) and times it;
2. runs the read stage (`video_stage.read_frames`: seek, decode forward, turn upright, PPM) on
   each block of `--frames-per-task` frames, pinned to one CPU, sampling every frame and every 10th: sampled
   frames per CPU-second (the process's CPU time, FFmpeg's threads included, so that other
   work on the machine does not count), and the wall time;
3. with `--end-to-end`, runs `raypose submit` twice on the same frames and boxes (a box table,
   two people a frame, `--preset` checkpoint): once as `images.format: video`, once on the
   frames PyAV decodes saved as JPEGs (quality 95) beforehand; prints each job's seconds and
   frames/s from its manifest.

    python benchmarks/video_decode.py --frames 300 --end-to-end
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

import pyarrow as pa
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from raypose.config.spec import VideoSpec  # noqa: E402
from raypose.inputs.video import index_videos  # noqa: E402
from raypose.pipeline.video_stage import read_frames  # noqa: E402
from raypose.schema import IMAGE_TASK_SCHEMA  # noqa: E402
from raypose.testing.synthetic import make_checkpoint, make_video  # noqa: E402


def frame_tasks(listing: pa.Table) -> pa.Table:
    """The plan's image tasks for listed frames (no boxes needed to decode)."""
    tasks = pa.Table.from_pylist([{"image_key": k, "image_uri": u, "box_xywh": [[0, 0, 1, 1]]}
                                  for k, u in zip(listing.column("image_key").to_pylist(),
                                                  listing.column("image_uri").to_pylist())], schema=IMAGE_TASK_SCHEMA)
    from raypose.inputs.video import with_frames

    return with_frames(tasks, listing)


def read_rate(video: Path, every: int, per_task: int) -> dict:
    """The read stage over every block of the video, sampling every `every`-th frame: seconds and frames/s."""
    videos = pa.table({"image_key": [video.name], "image_uri": [video.as_uri()]})
    started = time.perf_counter()
    listing, _, counts = index_videos(videos, {}, VideoSpec(every=every, frames_per_task=per_task))
    indexed = time.perf_counter() - started
    tasks = frame_tasks(listing)
    blocks = [tasks.slice(i, per_task) for i in range(0, tasks.num_rows, per_task)]  # as the Dataset cuts them
    started, cpu = time.perf_counter(), time.process_time()
    frames = sum(table.num_rows for block in blocks for table in read_frames(block, storage_options={}))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    # Pinned to one CPU, the process's CPU time (FFmpeg's threads included) is what the frames cost that CPU,
    # whatever else the machine runs; the wall time is given too.
    return {"every": every, "frames_in_video": counts[video.name], "frames_read": frames, "blocks": len(blocks),
            "index_seconds": round(indexed, 2), "read_seconds": round(seconds, 2), "read_cpu_seconds": round(cpu_seconds, 2),
            "frames_per_cpu_second": round(frames / cpu_seconds, 1), "load_average": os.getloadavg()[0]}


def submit(job: dict, folder: Path) -> dict:
    path = folder / f"{job['name']}.yaml"
    path.write_text(yaml.safe_dump(job))
    subprocess.run([sys.executable, "-m", "raypose.cli", "submit", str(path), "--quiet"], check=True)
    manifest = json.loads((Path(job["output"]["path"]) / "manifest.json").read_text())
    return {"job": job["name"], "load_average": os.getloadavg()[0], "seconds_total": round(manifest["seconds"]["total"], 1),
            "seconds_pipeline": round(manifest["seconds"]["pipeline"], 1), "images": manifest["counts"]["images"],
            "frames_per_second": round(manifest["counts"]["images"] / manifest["seconds"]["pipeline"], 2),
            "instances": manifest["counts"]["instances"]}


def end_to_end(video: Path, boxes: list, folder: Path, preset: str) -> list[dict]:
    """The video job and the JPEG job on the same frames and boxes."""
    import av
    from PIL import Image

    (folder / "jpegs").mkdir()
    with av.open(str(video)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            Image.fromarray(frame.to_ndarray(format="rgb24")).save(folder / "jpegs" / f"{video.name}#{index:06d}.jpg",
                                                                    quality=95)
    model = make_checkpoint(folder / "model", preset=preset)
    results = []
    for name, images, suffix in (("video", {"path": str(video.parent), "format": "video"}, ""),
                                 ("jpegs", {"path": str(folder / "jpegs")}, ".jpg")):
        table = folder / f"{name}_boxes.jsonl"
        table.write_text("\n".join(json.dumps({"image_key": f"{video.name}#{i:06d}{suffix}", "bbox": box})
                                   for i, frame_boxes in enumerate(boxes) for box in frame_boxes))
        job = {"name": name, "images": images, "boxes": {"source": "table", "path": str(table)},
               "pose": {"model": str(model), "dtype": "float32"}, "output": {"path": str(folder / f"{name}_out")}}
        results.append(submit(job, folder))
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--frames-per-task", type=int, default=VideoSpec().frames_per_task)
    parser.add_argument("--bit-rate", type=int, default=8_000_000, help="x264's target, bits/s (a 1080p camera's order)")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "videos").mkdir()
        video = folder / "videos" / "walk.mp4"
        started = time.perf_counter()
        boxes = make_video(video, frames=args.frames, size=(width, height), fps=30, grain=True, bit_rate=args.bit_rate)
        print(f"drew and encoded {args.frames} frames of {args.size} in {time.perf_counter() - started:.1f} s "
              f"({video.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one CPU: FFmpeg's threads follow
        for every in (1, 10):
            results.append(read_rate(video, every, args.frames_per_task))
            print(json.dumps(results[-1]))
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        if args.end_to_end:
            for result in end_to_end(video, boxes, folder, args.preset):
                results.append(result)
                print(json.dumps(result))
    return results


if __name__ == "__main__":
    main()
