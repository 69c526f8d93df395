"""When do shards commit, and what does a resume redo after the driver is killed midway?

Generates its own images and a checkpoint, then:

1. runs the job in full (a fresh `raypose submit` process, Ray start-up included) and reads
   when each shard committed (its marker's time) as a fraction of the pipeline's time;
2. runs it again into a fresh output and kills the driver's whole process group with
   SIGKILL at `--kill-at` of the full run's pipeline time (after its Ray start): the job is
   then about that fraction done;
3. resumes, and prints how much of the job the resume redid (the images of every shard not
   committed at the kill) against the bound: what was left, plus two shards.

    python benchmarks/resume.py --images 240 --shards 12 --preset tiny
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from raypose.testing.synthetic import make_checkpoint, make_coco_dataset  # noqa: E402


def submit(job: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "raypose.cli", "submit", str(job), "--quiet", *args], check=True)
    return time.perf_counter() - started


def committed(out: Path) -> list[dict]:
    markers = []
    for path in sorted((out / "_shards").glob("*.json")) if (out / "_shards").exists() else []:
        try:
            markers.append({**json.loads(path.read_text()), "mtime": path.stat().st_mtime})
        except (ValueError, OSError):  # being written
            pass
    return markers


def commit_timeline(out: Path) -> list[float]:
    """Each shard's commit time as a fraction of the pipeline (Ray start excluded), in commit order."""
    manifest = json.loads((out / "manifest.json").read_text())
    begin = datetime.fromisoformat(manifest["started_at"]).timestamp() + manifest["seconds"]["ray_start"]
    span = manifest["seconds"]["pipeline"]
    return sorted((m["mtime"] - begin) / span for m in committed(out))


def kill_midway(job: Path, out: Path, after_seconds: float) -> dict:
    """Run the job and SIGKILL its whole process group `after_seconds` after its pipeline started
    (its `job_started` record: Ray is up), as the full run's pipeline time is counted."""
    process = subprocess.Popen([sys.executable, "-m", "raypose.cli", "submit", str(job), "--log-format", "json"],
                               start_new_session=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in process.stderr:
        if '"event": "job_started"' in line:
            break
    started = time.monotonic()
    while process.poll() is None and time.monotonic() - started < after_seconds:
        time.sleep(0.05)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(2)  # let Ray's workers notice their raylet is gone
    return {"seconds": time.monotonic() - started, "images_committed": sum(m["images"] for m in committed(out)),
            "shards_committed": len(committed(out)), "finished": process.returncode == 0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of the pipeline's time at the kill")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="raypose-resume-"))
    make_coco_dataset(work, [(640, 480)] * args.images, persons_per_image=2)
    model = make_checkpoint(work / "model", preset=args.preset)

    def job_for(out: Path) -> Path:
        job = work / f"{out.name}.yaml"
        job.write_text(json.dumps({
            "name": "resume-bench", "images": {"path": str(work / "images")}, "boxes": {"path": str(work / "boxes.json")},
            "pose": {"model": str(model)},
            "output": {"path": str(out), "images_per_shard": -(-args.images // args.shards)},
        }))
        return job

    full_seconds = submit(job_for(work / "full"))
    timeline = commit_timeline(work / "full")
    full = json.loads((work / "full" / "manifest.json").read_text())["seconds"]
    killed_job = job_for(work / "killed")
    killed = kill_midway(killed_job, work / "killed", args.kill_at * full["pipeline"])
    resumed_seconds = submit(killed_job, "--resume")
    manifest = json.loads((work / "killed" / "manifest.json").read_text())
    redone = (args.images - killed["images_committed"]) / args.images
    result = {
        "images": args.images, "shards": len(timeline), "preset": args.preset,
        "full_seconds": full_seconds, "commit_fractions": [round(f, 3) for f in timeline],
        "median_commit_fraction": timeline[(len(timeline) - 1) // 2],
        "committed_by_half_time": sum(f <= 0.5 for f in timeline) / len(timeline),
        "killed": killed, "resume_seconds": resumed_seconds, "resume_shards": manifest["shards"],
        "redone_fraction": redone, "redo_bound": (1 - args.kill_at) + 2 / len(timeline),
    }
    print(f"{args.images} images in {len(timeline)} shards, preset {args.preset}; full run {full_seconds:.1f} s")
    print(f"shard commits (fraction of the pipeline): {', '.join(f'{f:.2f}' for f in timeline)}")
    print(f"  median shard committed at {result['median_commit_fraction']:.2f}; "
          f"{result['committed_by_half_time']:.0%} of shards by half-time")
    print(f"killed at {args.kill_at:.0%} of the pipeline ({killed['seconds']:.1f} s after start) with {killed['shards_committed']} "
          f"shards ({killed['images_committed']} images) committed")
    print(f"resume: {resumed_seconds:.1f} s, shards {manifest['shards']}; redid {redone:.0%} of the job "
          f"(bound: {1 - args.kill_at:.0%} left + 2 shards = {result['redo_bound']:.0%})")
    return result


if __name__ == "__main__":
    main()
