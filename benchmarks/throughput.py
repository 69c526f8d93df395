#!/usr/bin/env python
"""Throughput: the seed's reference pipeline vs the model ceiling vs `raypose submit`, in one run.

    python benchmarks/throughput.py --preset vitpose-small --images 64
    python benchmarks/throughput.py --preset vitpose-base --images 256 --device cuda --dtype bfloat16 --scale

It makes its own inputs (raypose.testing.synthetic: JPEGs cycling 640x480 / 1280x720 / 4000x3000 with
1-8 drawn people each, their COCO boxes, and a checkpoint of the preset's shape with random
weights), then measures on the same images, boxes, model, device and dtype:

  reference  AutoProcessor (as the seed: PIL/scipy, or torchvision where installed) -> VitPoseForPoseEstimation ->
             post_process_pose_estimation, image by image, JPEG decode (PIL) included;
  ceiling    the model forward alone (PoseEngine's model, dtype, device and normalisation) on
             pre-made crop tensors at the job's batch size, after warm-up; on CPU with every
             core's torch threads (the device's limit, not one actor's);
  raypose    the job end to end (plan_job + run_job in this process, Ray Data from JPEG bytes
             to Parquet), as crops/s over the pipeline (the issue's figure: Ray start-up
             excluded), over plan + Ray start + pipeline, and from the first crop task's start
             to the end.

It prints a table and writes JSON (--json). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DEFAULT_SIZES = "640x480,1280x720,4000x3000"
# --workload: named image mixes. mixed: the three sizes in turn (the default); coco: COCO-like 640x480 photos.
WORKLOADS = {"mixed": DEFAULT_SIZES, "coco": "640x480"}
ROWS = ("reference", "ceiling", "raypose", "host")


# --------------------------------------------------------------------------------------- args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="throughput.py",
        description="raypose throughput vs the reference pipeline and the model-forward ceiling.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="vitpose-small", help="raypose.testing.synthetic.PRESETS shape (random weights)")
    p.add_argument("--images", type=int, default=64, help="number of images (N)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="mixed",
                   help="image sizes by name: mixed (640x480, 1280x720, 4000x3000 in turn) or coco (640x480)")
    p.add_argument("--sizes", default=None, help="image sizes WxH, cycled over the images (overrides --workload)")
    p.add_argument("--persons", default="1-8", help="people per image, MIN-MAX")
    p.add_argument("--box-heights", default="0.3-0.8", help="person height as a fraction of image height, MIN-MAX")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-copies", type=int, default=1,
                   help="each of the N images K times (hard links under other names, the same boxes): a job of "
                        "N*K images for a steady state of 100k+ crops without drawing them all; every row sees them")
    p.add_argument("--batch-size", type=int, default=None, help="pose.batch_size (default: the spec's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--pose-actors", type=int, default=None, help="resources.pose_actors (default: the spec's)")
    p.add_argument("--flip-test", action="store_true", help="pose.flip_test for all three rows")
    p.add_argument("--scale", action="store_true",
                   help="also run raypose at N (warm) and 4N images: time ratio and peak-memory ratio")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra job override, as `raypose submit --set` (repeatable)")
    p.add_argument("--rows", default="reference,ceiling,raypose",
                   help=f"which rows to measure (comma-separated, of {', '.join(ROWS)})")
    p.add_argument("--ceiling-threads", type=int, default=None,
                   help="CPU: torch threads for the reference (default: all usable cores) and for a one-process "
                        "ceiling (default: the ceiling mirrors raypose's pose actors and threads)")
    p.add_argument("--ceiling-min-seconds", type=float, default=3.0, help="least timed time for the ceiling")
    # Each sample reads /proc for the whole process tree: with PSS (smaps_rollup) every 0.2 s that
    # cost raypose 13% of its rate on 2 cores (11.18 vs 12.71 crops/s at 2 s, vitpose-small).
    p.add_argument("--sample-interval", type=float, default=1.0, help="RSS, CPU and GPU sampling period (s)")
    p.add_argument("--pss-interval", type=float, default=5.0, help="PSS sampling period (s)")
    p.add_argument("--out", default="bench-out", help="work folder: data, checkpoint, job outputs")
    p.add_argument("--json", dest="json_path", default=None, help="result JSON (default OUT/throughput.json)")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="images.jpeg_draft for the raypose rows (JPEG DCT-domain downscale; changes crop pixels)")
    p.add_argument("--no-trace", action="store_true",
                   help="do not wrap the pipeline's stages to time them (no first-crop / actor-busy figures)")
    args = p.parse_args(argv)
    # The job files written under OUT name their inputs by path, and a job's relative paths are read
    # against its own folder: OUT/jobs/... would not find OUT/data/... given as a relative path.
    args.out = str(Path(args.out).resolve())
    args.sizes = args.sizes or WORKLOADS[args.workload]
    args.size_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s]
    args.person_range = tuple(int(v) for v in args.persons.split("-"))
    args.height_range = tuple(float(v) for v in args.box_heights.split("-"))
    args.trace_prefix = f"{Path(args.json_path).stem}-" if args.json_path else ""
    if args.jpeg_draft:
        args.overrides.append("images.jpeg_draft=true")
    args.row_set = {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = args.row_set - set(ROWS)
    if unknown:
        p.error(f"--rows: unknown {sorted(unknown)}; choose from {ROWS}")
    if args.images < 1:
        p.error("--images: expected a positive integer")
    if args.image_copies < 1:
        p.error("--image-copies: expected a positive integer")
    return args


# ------------------------------------------------------------------------- memory and GPU


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _process_tree(root: int) -> list[int]:
    """root and its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _cpu_seconds(pid: int, tick: float) -> float | None:
    """utime + stime of a process so far (its own, not its reaped children's)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * tick
    except (OSError, ValueError, IndexError):
        return None


# What a process of a raypose run is, from its name (Ray names a worker after the task or actor it runs).
_RAY_DATA_HELPERS = ("ray::_StatsActo", "ray::_Autoscali", "ray::ActorLocat", "ray::SplitCoord")
_RAY_OWN = ("gcs_server", "raylet", "ray::DashboardA", "ray::RuntimeEnv", "process_api")


def _process_kind(pid: int, me: int) -> str | None:
    """The part of the run a process is (driver, pose actors, ...); None for a task worker idle between tasks."""
    if pid == me:
        return "driver"
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        if comm == "python":  # Ray's Python daemons keep the interpreter's name: their script says which
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                scripts = [arg for arg in f.read(1000).split(b"\0") if arg.endswith(b".py")]
            comm = scripts[0].decode(errors="replace").rsplit("/", 1)[-1] if scripts else comm
    except OSError:
        return "other"
    if comm.startswith("ray::MapWorker"):
        return "actor pools (pose)"
    if comm.startswith(_RAY_DATA_HELPERS):
        return "Ray Data helper actors"
    if comm.startswith(_RAY_OWN) or comm in ("dashboard.py", "log_monitor.py", "monitor.py", "agent_manager.py"):
        return "Ray's own processes"
    if comm == "ray::IDLE":
        return None
    return "task workers" if comm.startswith("ray::") else "other"


def _rss_pss(pid: int, page: int, with_pss: bool = True) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * page
        if not with_pss:
            return rss, pss
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


class Sampler:
    """Samples this process tree's memory (sum of RSS, sum of PSS) and, with nvidia-smi, the GPU.

    Peaks are kept per phase (`with sampler.phase("name")`). RSS sums count shared pages
    (libraries, Ray's object store) once per process; PSS shares them out, so the PSS sum is
    the tree's real footprint. Processes outside this tree (a remote Ray cluster) are not seen.
    CPU time: per process, the last sampled utime+stime minus its value at the phase's start
    (0 for processes started during the phase); a process that exits loses at most one
    sampling period. CPU-seconds per crop are robust to other load on a shared machine,
    wall-clock rates are not.
    """

    def __init__(self, interval: float = 1.0, gpu: bool = False, pss_interval: float = 5.0):
        self.interval = interval
        # PSS (smaps_rollup) is ~96% of a sample's cost (~27 ms for a Ray tree with a loaded pose
        # actor), so it is read less often than RSS: a pipeline's memory is a plateau, not a spike.
        self.pss_interval = pss_interval
        self._pss_at = 0.0
        self.available = os.path.isdir("/proc/self")
        self.page = os.sysconf("SC_PAGE_SIZE") if self.available else 4096
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK") if self.available else 0.01
        self._lock = threading.Lock()
        self.phases: dict[str, dict[str, Any]] = {}
        self.current: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._smi: subprocess.Popen | None = None
        self.gpu = gpu and shutil.which("nvidia-smi") is not None
        if self.gpu:
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 f"-lms={max(100, int(interval * 1000))}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            threading.Thread(target=self._read_smi, name="bench-smi", daemon=True).start()

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._smi is not None:
            self._smi.terminate()
            with contextlib.suppress(Exception):
                self._smi.wait(timeout=5)

    @contextlib.contextmanager
    def phase(self, name: str):
        stats = {"rss_peak": 0, "pss_peak": 0, "self_rss_peak": 0, "self_pss_peak": 0, "samples": 0, "gpu_util": [], "gpu_mem_peak_mib": None,
                 "cpu_start": {}, "cpu_last": {}, "kind": {}, "wall_start": time.perf_counter()}
        if self.available:
            for pid in _process_tree(os.getpid()):
                cpu = _cpu_seconds(pid, self.tick)
                if cpu is not None:
                    stats["cpu_start"][pid] = cpu
        self.phases[name] = stats
        self.current = stats
        self._sample(force_pss=True)
        try:
            yield stats
        finally:
            self._sample(force_pss=True)
            self.current = None
            stats["wall_seconds"] = time.perf_counter() - stats["wall_start"]

    def _sample(self, force_pss: bool = False) -> None:
        stats = self.current
        if stats is None or not self.available:
            return
        rss = pss = 0
        me = os.getpid()
        with self._lock:
            with_pss = force_pss or time.perf_counter() - self._pss_at >= self.pss_interval
            if with_pss:
                self._pss_at = time.perf_counter()
            for pid in _process_tree(me):
                r, p = _rss_pss(pid, self.page, with_pss)
                rss, pss = rss + r, pss + p
                if pid == me:
                    stats["self_rss_peak"] = max(stats["self_rss_peak"], r)
                    stats["self_pss_peak"] = max(stats["self_pss_peak"], p)
                cpu = _cpu_seconds(pid, self.tick)
                if cpu is not None:
                    stats["cpu_last"][pid] = cpu
                    kind = _process_kind(pid, me)
                    if kind is not None or pid not in stats["kind"]:
                        stats["kind"][pid] = kind or "task workers"
        stats["rss_peak"] = max(stats["rss_peak"], rss)
        stats["pss_peak"] = max(stats["pss_peak"], pss)
        stats["samples"] += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _read_smi(self) -> None:
        assert self._smi is not None and self._smi.stdout is not None
        for line in self._smi.stdout:
            stats = self.current
            try:
                util, mem = (float(v) for v in line.split(",")[:2])  # first GPU's line comes first
            except ValueError:
                continue
            if stats is not None:
                stats["gpu_util"].append(util)
                stats["gpu_mem_peak_mib"] = max(stats["gpu_mem_peak_mib"] or 0.0, mem)

    @staticmethod
    def summary(stats: dict[str, Any] | None, own: bool = False) -> dict[str, Any]:
        """Peaks of the phase; `own`: this process's alone (for work done in this process only,
        while a Ray started earlier idles beside it)."""
        if not stats:
            return {}
        if own:
            stats = {**stats, "rss_peak": stats["self_rss_peak"], "pss_peak": stats["self_pss_peak"]}
        util = stats.get("gpu_util") or []
        used = {pid: last - stats["cpu_start"].get(pid, 0.0) for pid, last in stats.get("cpu_last", {}).items()}
        cpu = sum(used.values())
        by_kind: dict[str, float] = {}
        for pid, seconds in used.items():
            kind = stats.get("kind", {}).get(pid, "other")
            by_kind[kind] = by_kind.get(kind, 0.0) + seconds
        wall = stats.get("wall_seconds")
        return {
            "cpu_seconds_tree": round(cpu, 2) if stats.get("cpu_last") else None,
            "cores_busy_mean": round(cpu / wall, 2) if stats.get("cpu_last") and wall else None,
            "cpu_seconds_by_process": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
                                       if v >= 0.05},
            "peak_rss_tree_mib": round(stats["rss_peak"] / 2**20, 1) if stats["rss_peak"] else None,
            "peak_pss_tree_mib": round(stats["pss_peak"] / 2**20, 1) if stats["pss_peak"] else None,
            "memory_samples": stats["samples"],
            "gpu_util_mean_pct": round(sum(util) / len(util), 1) if util else None,
            "gpu_mem_peak_smi_mib": stats.get("gpu_mem_peak_mib"),
        }


# ----------------------------------------------------------------------------------- inputs


def prepare_inputs(args: argparse.Namespace, counts: list[int]) -> dict[str, Any]:
    """Images (shared pool, grown as needed), per-count manifests and boxes, and the checkpoint."""
    from raypose.testing.synthetic import make_benchmark_dataset, make_checkpoint

    out = Path(args.out)
    sizes = "_".join(f"{w}x{h}" for w, h in args.size_list)
    pool = out / "data" / f"s{args.seed}-{sizes}-p{args.persons}-h{args.box_heights}"
    started = time.perf_counter()
    sets = {}
    for n in sorted(set(counts)):
        manifest, boxes = make_benchmark_dataset(
            pool, n, sizes=args.size_list, persons=args.person_range, box_heights=args.height_range, seed=args.seed,
            workers=_usable_cores(),
        )
        if args.image_copies > 1:
            manifest, boxes = image_copies(pool, manifest, boxes, args.image_copies)
        sets[n] = {"manifest": manifest, "boxes": boxes, "folder": pool}
    checkpoint = out / "checkpoints" / f"{args.preset}-seed{args.seed}"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, preset=args.preset, seed=args.seed)
    return {"sets": sets, "checkpoint": checkpoint, "seconds": time.perf_counter() - started}


def image_copies(pool: Path, manifest: Path, boxes: Path, copies: int) -> tuple[Path, Path]:
    """The manifest's images `copies` times: copy k of images/NAME is a hard link copies/k/images/NAME
    (same bytes, no new drawing or disk), with the same boxes; the new manifest and COCO file."""
    keys = manifest.read_text().split()
    coco = json.loads(boxes.read_text())
    images, annotations = list(coco["images"]), list(coco["annotations"])
    last_image = max((image["id"] for image in images), default=0)
    last_annotation = max((ann["id"] for ann in annotations), default=0)
    all_keys = list(keys)
    for copy in range(1, copies):
        for key in keys:
            link = pool / "copies" / str(copy) / key
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(pool / key, link)
            all_keys.append(f"copies/{copy}/{key}")
        images += [{**image, "id": image["id"] + copy * last_image, "file_name": f"copies/{copy}/{image['file_name']}"}
                   for image in coco["images"]]
        annotations += [{**ann, "id": ann["id"] + copy * last_annotation, "image_id": ann["image_id"] + copy * last_image}
                        for ann in coco["annotations"]]
    stem = f"{len(keys)}x{copies}"
    repeated_manifest, repeated_boxes = pool / f"images-{stem}.txt", pool / f"boxes-{stem}.json"
    repeated_manifest.write_text("".join(f"{key}\n" for key in all_keys))
    repeated_boxes.write_text(json.dumps({**coco, "images": images, "annotations": annotations}))
    return repeated_manifest, repeated_boxes


def _coco_images(boxes_path: Path) -> list[tuple[str, list[list[float]]]]:
    coco = json.loads(Path(boxes_path).read_text())
    by_image: dict[int, list[list[float]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    return [(img["file_name"], by_image.get(img["id"], [])) for img in coco["images"]]


# ----------------------------------------------------------------------------------- reference


def run_reference(expert, pose, data: dict, threads: int | None) -> dict[str, Any]:
    """The seed's pipeline, image by image: PIL decode -> processor -> model -> post-process."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, VitPoseForPoseEstimation

    from raypose.imaging.keypoint_schemas import SCHEMAS

    device, dtype = torch.device(pose.device), getattr(torch, pose.dtype)
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    checkpoint = expert.model.model_id
    processor = AutoProcessor.from_pretrained(checkpoint)  # as the seed: PIL/scipy, or torchvision where installed
    model = VitPoseForPoseEstimation.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    flip_pairs = torch.tensor(SCHEMAS[expert.keypoint_schema].flip_pairs, dtype=torch.long, device=device)
    folder = data["folder"]
    images = _coco_images(data["boxes"])

    def one(name: str, boxes: list[list[float]]) -> int:
        image = Image.open(folder / name).convert("RGB")
        inputs = processor(image, boxes=[boxes], return_tensors="pt")
        pixels = inputs["pixel_values"].to(device, dtype)
        kwargs = {}
        if expert.dataset_index is not None:
            kwargs["dataset_index"] = torch.full((len(boxes),), expert.dataset_index, device=device)
        with torch.inference_mode():
            outputs = model(pixel_values=pixels, **kwargs)
            if pose.flip_test:  # transformers' documented flip test: mirrored pass, flipped back, averaged
                flipped = model(pixel_values=pixels.flip(3), flip_pairs=flip_pairs, **kwargs)
                outputs.heatmaps = (outputs.heatmaps + flipped.heatmaps) * 0.5
        outputs.heatmaps = outputs.heatmaps.float()  # numpy has no bfloat16
        processor.post_process_pose_estimation(outputs, boxes=[np.array(boxes, np.float32)])
        return len(boxes)

    one(*images[0])  # warm-up, not timed
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    crops = sum(one(name, boxes) for name, boxes in images if boxes)
    _sync(device)
    seconds = time.perf_counter() - started
    result = {
        "crops": crops, "images": len(images), "seconds": seconds, "crops_per_second": crops / seconds,
        "cpu_seconds_per_crop": (time.process_time() - cpu_started) / crops,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batching": "one image's boxes per forward", "processor": type(processor).__name__,
    }
    if device.type == "cuda":
        result["gpu_mem_peak_torch_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del model
    return result


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- ceiling


def run_ceiling(expert, pose, bs: int, n_crops: int, threads: int | None, min_seconds: float,
                processes: int = 1) -> dict[str, Any]:
    """PoseEngine's model forward alone, on pre-made normalised crops at the job's batch size.

    `expert` is the job's default expert (routing.Expert: checkpoint info, dataset_index);
    with pose.flip_test the forward takes the doubled batch, as PoseEngine.estimate does.
    `processes` > 1 runs that many forward loops at once in processes of their own, `threads`
    each, as raypose's CPU pose actors do: their crops per second add up.
    """
    if processes > 1:
        return _parallel_ceiling(expert, pose, bs, n_crops, threads, min_seconds, processes)
    return _forward_loop(expert, pose, bs, n_crops, threads, min_seconds)


def _parallel_ceiling(expert, pose, bs, n_crops, threads, min_seconds, processes) -> dict[str, Any]:
    import tempfile

    job = {"model": expert.model.model_id, "dataset_index": expert.dataset_index, "device": pose.device,
           "dtype": pose.dtype, "compile": pose.compile, "flip_test": pose.flip_test, "batch_size": bs,
           "crops": math.ceil(n_crops / processes), "threads": threads, "min_seconds": min_seconds,
           "processes": processes}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as ready:
        workers = [subprocess.Popen([sys.executable, __file__, "--ceiling-worker", json.dumps({**job, "ready": ready})],
                                    stdout=subprocess.PIPE, env=env, text=True) for _ in range(processes)]
        outputs = [worker.communicate()[0] for worker in workers]
    if any(worker.returncode for worker in workers):
        raise RuntimeError(f"a ceiling process failed: exit codes {[w.returncode for w in workers]}")
    parts = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    crops = sum(p["crops"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    return {**parts[0], "crops": crops, "batches": sum(p["batches"] for p in parts), "seconds": seconds,
            "crops_per_second": sum(p["crops_per_second"] for p in parts),
            "cpu_seconds_per_crop": sum(p["cpu_seconds_per_crop"] * p["crops"] for p in parts) / crops,
            "processes": processes, "crops_per_second_each": [round(p["crops_per_second"], 2) for p in parts]}


def _ceiling_worker(job: dict) -> None:
    """One of `_parallel_ceiling`'s processes: waits for the others to be warm, then prints its loop's result."""
    from types import SimpleNamespace

    from raypose.models.vitpose import inspect_model

    expert = SimpleNamespace(model=inspect_model(job["model"]), dataset_index=job["dataset_index"])
    pose = SimpleNamespace(**{k: job[k] for k in ("device", "dtype", "compile", "flip_test")})

    def all_warm() -> None:
        Path(job["ready"], str(os.getpid())).touch()
        while len(os.listdir(job["ready"])) < job["processes"]:
            time.sleep(0.01)

    result = _forward_loop(expert, pose, job["batch_size"], job["crops"], job["threads"], job["min_seconds"], all_warm)
    print(json.dumps(result))


def _forward_loop(expert, pose, bs: int, n_crops: int, threads: int | None, min_seconds: float,
                  warm=None) -> dict[str, Any]:
    import torch

    from raypose.models.vitpose import PoseEngine

    if threads:
        torch.set_num_threads(threads)
    engine = PoseEngine(expert.model, device=pose.device, dtype=pose.dtype, compile=pose.compile)
    device, dtype = engine.device, engine.dtype
    width, height = engine.info.input_size
    rng = np.random.default_rng(0)
    crops = torch.from_numpy(rng.integers(0, 256, (bs, height, width, 3), dtype=np.uint8))
    mean = torch.tensor(engine.info.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(engine.info.image_std, device=device).view(1, 3, 1, 1)
    pixels = ((crops.to(device).permute(0, 3, 1, 2).float() / 255.0 - mean) / std).to(dtype)
    if pose.flip_test:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    pixels = pixels.contiguous()
    kwargs = {}
    if expert.dataset_index is not None:
        kwargs["dataset_index"] = torch.full((pixels.shape[0],), expert.dataset_index, dtype=torch.long, device=device)

    def forward() -> None:
        engine.model(pixel_values=pixels, **kwargs)

    with torch.inference_mode():
        for _ in range(3 if device.type == "cuda" else 1):  # warm-up
            forward()
        _sync(device)
        if warm is not None:
            warm()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        wanted = max(2, math.ceil(n_crops / bs))
        batches, started, cpu_started = 0, time.perf_counter(), time.process_time()
        while True:
            forward()
            batches += 1
            if device.type == "cuda" and batches % 8 == 0:
                _sync(device)
            elapsed = time.perf_counter() - started
            if batches >= wanted and elapsed >= min_seconds:
                break
            if batches >= 2 and elapsed >= max(60.0, 4 * min_seconds):
                break
        _sync(device)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
    result = {
        "crops": batches * bs, "batches": batches, "batch_size": bs, "seconds": seconds,
        "cpu_seconds_per_crop": cpu_seconds / (batches * bs),
        "crops_per_second": batches * bs / seconds, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "flip_test": pose.flip_test,
    }
    if device.type == "cuda":
        result["gpu_mem_peak_torch_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del engine
    return result


# ------------------------------------------------------------------------------------- raypose


def write_job(args: argparse.Namespace, data: dict, checkpoint: Path, output: Path, path: Path) -> Path:
    pose: dict[str, Any] = {"model": str(checkpoint), "dtype": args.dtype, "device": args.device,
                            "flip_test": bool(args.flip_test)}
    if args.batch_size is not None:
        pose["batch_size"] = args.batch_size
    job: dict[str, Any] = {
        "name": "bench",
        "images": {"path": str(data["manifest"])},
        "boxes": {"source": "coco", "path": str(data["boxes"])},
        "pose": pose,
        "output": {"path": str(output), "mode": "overwrite"},
    }
    if args.pose_actors is not None:
        job["resources"] = {"pose_actors": args.pose_actors}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def load_spec(job: Path, overrides: list[str]):
    from raypose.config.spec import load_job_spec

    return load_job_spec(job, overrides)


def stage_tracer(trace_path: Path, instant_forward: bool = False):
    """A `build_dataset` stage wrapper that times the job's tasks and pose-actor calls from inside the workers.

    Each call appends one JSON line (wall-clock start/end, rows) to `trace_path`. The workers
    share this machine's clock, so the first crop task's start can be set against the
    driver's end time. Costs a file append per block/batch. `instant_forward`: each pose
    engine's model is replaced by a stand-in that returns zero heatmaps of the model's shape
    at once (the host row: everything but the forward, i.e. the host's own limit).
    """
    trace = str(trace_path)

    # Defined here (not at module level) so Ray pickles them by value: the workers need
    # not import this script.
    def append(record: dict) -> None:
        import json as _json

        with open(trace, "a") as f:
            f.write(_json.dumps(record) + "\n")

    def timed_task(fn, stage_name: str):
        def task(batch, **kwargs):
            import os as _os
            import time as _time

            import pyarrow as _pa

            start = _time.time()
            out = fn(batch, **kwargs)  # a table, or a crop task's tables part by part
            out = out if isinstance(out, _pa.Table) else _pa.concat_tables(list(out))
            record = {"stage": stage_name, "start": start, "end": _time.time(), "images": batch.num_rows,
                      "pid": _os.getpid()}
            if "crop" in out.column_names:
                record.update(rows=out.num_rows, crops=out.num_rows - out.column("crop").null_count)
            append(record)
            return out

        task.__name__ = fn.__name__
        return task

    def timed_cropper(cropper):
        def crop(batch, device):
            import os as _os
            import time as _time

            start = _time.time()
            rows, pixels = cropper(batch, device)
            append({"stage": "crop", "start": start, "end": _time.time(), "images": batch.num_rows,
                    "rows": rows.num_rows, "crops": rows.column("error_stage").null_count, "pid": _os.getpid()})
            return rows, pixels

        crop.parts = cropper.parts  # the cropper's own cut of a call into bounded parts
        return crop

    def wrap(stage):
        if stage.name in ("make_crops", "make_crops_in_parts", "plan_crops"):
            return stage.with_fn(timed_task(stage.fn, "read" if stage.name == "plan_crops" else "crop"))
        if stage.name != "pose":
            return stage
        original = stage.fn

        class PoseStage(original):
            def __init__(self, *a, **k):
                import os as _os
                import time as _time

                from raypose.pipeline.croppers import CropColumn

                start = _time.time()
                super().__init__(*a, **k)
                if instant_forward:
                    from raypose.testing.synthetic import instant_heatmaps

                    for engine in self.engines.values():
                        engine.model = instant_heatmaps(engine.info)
                if not isinstance(self.cropper, CropColumn):  # crops made here: timed as the crop stage
                    self.cropper = timed_cropper(self.cropper)
                append({"stage": "pose_init", "start": start, "end": _time.time(), "pid": _os.getpid()})

            def __call__(self, batch):
                import os as _os
                import time as _time

                import torch as _torch

                start = _time.time()
                out = super().__call__(batch)
                # Crops that got keypoints (an actor that crops itself takes image rows in).
                crops = out.num_rows - out.column("keypoint_x").null_count
                record = {"stage": "pose", "start": start, "end": _time.time(), "rows": crops,
                          "pid": _os.getpid(), "threads": _torch.get_num_threads()}
                if _torch.cuda.is_available() and _torch.cuda.is_initialized():
                    record["gpu_mem_peak_torch_mib"] = round(_torch.cuda.max_memory_allocated() / 2**20, 1)
                append(record)
                return out

        PoseStage.__name__ = PoseStage.__qualname__ = original.__name__
        return stage.with_fn(PoseStage)

    return wrap


def run_raypose(args: argparse.Namespace, data: dict, checkpoint: Path, tag: str,
                instant_forward: bool = False) -> dict[str, Any]:
    """One `raypose submit` in this process: plan_job + run_job (Ray reused if already up); with
    `instant_forward` the pose forward is a stand-in (the host-capacity row, always traced)."""
    import ray

    from raypose.pipeline.plan import plan_job
    from raypose.pipeline.run import run_job

    out = Path(args.out)
    job = write_job(args, data, checkpoint, out / "runs" / tag, out / "jobs" / f"{tag}.yaml")
    trace = out / "traces" / f"{args.trace_prefix}{tag}.jsonl"
    trace.parent.mkdir(parents=True, exist_ok=True)
    trace.unlink(missing_ok=True)
    ray_was_up = ray.is_initialized()
    started = time.time()
    spec = load_spec(job, args.overrides)
    plan = plan_job(spec, run=True)
    planned = time.time()
    tracing = not args.no_trace or instant_forward
    result = run_job(plan, wrap=stage_tracer(trace, instant_forward) if tracing else None)
    ended = time.time()
    seconds = dict(result.seconds)
    instances = result.counts.get("instances_this_run", result.counts["instances"])
    row: dict[str, Any] = {
        "tag": tag, "job": str(job), "output": result.output_path, "images": plan.counts.get("images_with_boxes", plan.counts.get("images")),
        "crops": instances, "errors": result.counts.get("errors"),
        "seconds": {"plan": planned - started, "ray_start": seconds["ray_start"],
                    "pipeline": seconds["pipeline"], "total": seconds["total"], "end_to_end": ended - started},
        "ray_started_here": not ray_was_up,
        "crops_per_second": instances / seconds["pipeline"],
        "crops_per_second_with_start": instances / (ended - started),
        "spec": {"batch_size": spec.pose.batch_size, "dtype": spec.pose.dtype, "device": spec.pose.device,
                 "flip_test": spec.pose.flip_test, "resources": spec.resources.model_dump()},
        "layout": result.manifest["layout"],
        "ray_cpus": ray.cluster_resources().get("CPU"), "ray_gpus": ray.cluster_resources().get("GPU", 0.0),
    }
    if tracing:
        row["trace"] = summarize_trace(trace, ended, instances, result.manifest["layout"]["crop_in"])
        if row["trace"].get("first_crop_start"):
            row["crops_per_second_from_first_crop"] = instances / (ended - row["trace"]["first_crop_start"])
    return row


def run_scale(args: argparse.Namespace, inputs: dict, checkpoint: Path, sampler, n: int) -> dict[str, Any]:
    """raypose at N again (Ray warm) and at 4N: the time and memory ratios of linear scaling."""
    runs = {}
    for count, tag in ((n, f"n{n}-warm"), (4 * n, f"n{4 * n}")):
        with sampler.phase(tag) as stats:
            runs[count] = {**run_raypose(args, inputs["sets"][count], checkpoint, tag), **Sampler.summary(stats)}
    a, b = runs[n], runs[4 * n]
    return {
        "n": n, "n4": 4 * n, "runs": {"n": a, "n4": b},
        "time_ratio": b["seconds"]["pipeline"] / a["seconds"]["pipeline"],
        "crops_ratio": b["crops"] / a["crops"],
        "pss_ratio": _ratio(b.get("peak_pss_tree_mib"), a.get("peak_pss_tree_mib")),
        "rss_ratio": _ratio(b.get("peak_rss_tree_mib"), a.get("peak_rss_tree_mib")),
    }


def summarize_trace(path: Path, ended: float, instances: int, crop_in: str) -> dict[str, Any]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    crop = [r for r in records if r["stage"] == "crop"]
    read = [r for r in records if r["stage"] == "read"]
    pose = [r for r in records if r["stage"] == "pose"]
    init = [r for r in records if r["stage"] == "pose_init"]
    first_stage = read or crop  # the first stage: read tasks (crops on the pose device), else the crop step
    if not first_stage:
        return {}
    first = min(r["start"] for r in first_stage)
    summary: dict[str, Any] = {
        "crop_in": crop_in,
        "first_crop_start": first,
        "seconds_first_crop_to_end": ended - first,
        "seconds_first_crop_block": min(r["end"] for r in first_stage) - first,
        "crop_tasks": len(first_stage),
        "crop_task_processes": len({r["pid"] for r in first_stage}),
    }
    crops = sum(r.get("crops", 0) for r in crop)
    if crops:
        summary["crop_stage_ms_per_crop"] = 1000 * sum(r["end"] - r["start"] for r in crop) / crops
    if read:
        summary["read_ms_per_image"] = 1000 * sum(r["end"] - r["start"] for r in read) / max(1, sum(r["images"] for r in read))
    if init:
        summary["pose_actor_init_seconds"] = [round(r["end"] - r["start"], 3) for r in init]
        if crop_in != "pose_actor":
            summary["seconds_first_crop_to_first_actor_ready"] = min(r["end"] for r in init) - first
    if pose:
        busy = sum(r["end"] - r["start"] for r in pose)
        span = max(r["end"] for r in pose) - min(r["start"] for r in pose)
        summary.update({
            "pose_batches": len(pose),
            "pose_busy_seconds": busy,
            "pose_actor_processes": len({r["pid"] for r in pose}),
            "pose_busy_fraction_of_first_crop_to_end": busy / (ended - first) / max(1, len({r["pid"] for r in pose})),
            "pose_crops_per_busy_second": sum(r["rows"] for r in pose) / busy if busy else None,
            "pose_span_seconds": span,
            "seconds_first_crop_to_first_pose": min(r["start"] for r in pose) - first,
            # Once the (slowest-starting) model is loaded: the pipeline's steady rate, start-up costs left out.
            "crops_per_second_first_pose_to_end": sum(r["rows"] for r in pose) / (ended - min(r["start"] for r in pose)),
            "seconds_last_pose_to_end": ended - max(r["end"] for r in pose),
            "pose_threads": sorted({r.get("threads") for r in pose}),
        })
        gpu = [r["gpu_mem_peak_torch_mib"] for r in pose if "gpu_mem_peak_torch_mib" in r]
        if gpu:
            summary["gpu_mem_peak_torch_mib"] = max(gpu)
    return summary


# ------------------------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    import ray
    import torch
    import transformers

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu, "usable_cores": _usable_cores(), "python": platform.python_version(),
        "torch": torch.__version__, "ray": ray.__version__, "transformers": transformers.__version__,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(value, spec: str = ".1f", empty: str = "-") -> str:
    if value is None:
        return empty
    return format(value, spec)


def print_table(result: dict[str, Any], file=sys.stdout) -> None:
    rows = result["rows"]
    ref = rows.get("reference", {}).get("crops_per_second")
    ceil = rows.get("ceiling", {}).get("crops_per_second")
    header = ("row", "crops", "seconds", "crops/s", "x reference", "x ceiling", "CPU-s/crop", "peak RSS MiB",
              "peak PSS MiB", "GPU util %", "GPU mem MiB")
    lines = []
    for name, row in rows.items():
        cps = row.get("crops_per_second")
        lines.append((
            name, str(row.get("crops", "-")), _fmt(row.get("seconds"), ".2f"), _fmt(cps, ".2f"),
            _fmt(cps / ref if cps and ref else None, ".2f"), _fmt(cps / ceil if cps and ceil else None, ".2f"),
            _fmt(row.get("cpu_seconds_per_crop"), ".3f"), _fmt(row.get("peak_rss_tree_mib"), ".0f"), _fmt(row.get("peak_pss_tree_mib"), ".0f"),
            _fmt(row.get("gpu_util_mean_pct"), ".0f"),
            _fmt(row.get("gpu_mem_peak_torch_mib") or row.get("gpu_mem_peak_smi_mib"), ".0f"),
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    cfg = result["config"]
    resolved = rows.get("ceiling") or rows.get("reference") or {}
    device, dtype = resolved.get("device", cfg["device"]), resolved.get("dtype", cfg["dtype"])
    print(f"\nraypose throughput: preset {cfg['preset']}, {cfg['images']} images"
          f"{' x ' + str(cfg['image_copies']) + ' copies' if cfg.get('image_copies', 1) > 1 else ''}, batch {cfg['batch_size']}, "
          f"{device} {dtype}, flip_test {cfg['flip_test']}, jpeg_draft {cfg['jpeg_draft']}, "
          f"overrides {cfg['overrides'] or 'none'}; {result['machine']['cpu']} "
          f"({result['machine']['usable_cores']} cores){', ' + result['machine']['gpu'] if 'gpu' in result['machine'] else ''}",
          file=file)
    load = [result["machine"].get(k) for k in ("load_average_at_start", "load_average_at_end")]
    if all(load):
        print(f"load average (1 min) {load[0][0]:.1f} at start, {load[1][0]:.1f} at end: with more runnable "
              f"threads than the {result['machine']['usable_cores']} cores, the timings are contended", file=file)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), file=file)
    for line in lines:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))), file=file)
    ceiling = result["rows"].get("ceiling")
    if ceiling and ceiling.get("threads"):
        print(f"ceiling: {ceiling.get('processes', 1)} forward process(es) x {ceiling['threads']} torch thread(s), as "
              f"raypose's CPU pose actors; reference: {result['config'].get('reference_threads')} threads", file=file)
    print("memory: reference and ceiling rows are this process (a ceiling in several, their tree); raypose rows its process tree (driver, Ray, "
          "workers), PSS-summed so shared pages count once. CPU-s/crop: reference/ceiling = timed loop; raypose = "
          "whole tree over the run, start-up included", file=file)
    main = result.get("raypose")
    if main and main.get("trace"):
        t = main["trace"]
        busy = t.get("pose_busy_fraction_of_first_crop_to_end")
        if t.get("crop_in") == "pose_actor":
            actors = t.get("pose_actor_processes") or 1
            who = "the pose actor" if actors == 1 else f"each of {actors} pose actors"
            stages = (f"crops in the pose actors, {_fmt(t.get('crop_stage_ms_per_crop'))} ms/crop; {who} "
                      f"(crops + forwards) busy {_fmt(100 * busy if busy is not None else None, '.0f')}%")
        elif t.get("crop_in") == "pose_device":
            stages = (f"read + headers + geometry {_fmt(t.get('read_ms_per_image'))} ms/image over {t['crop_tasks']} "
                      f"tasks; decode + cuts in the pose actor {_fmt(t.get('crop_stage_ms_per_crop'))} ms/crop; pose actor ready {_fmt(t.get('seconds_first_crop_to_first_pose'), '.1f')} s after "
                      f"the first read, busy (decode + crops + forwards) {_fmt(100 * busy if busy is not None else None, '.0f')}%")
        else:
            stages = (f"crop {_fmt(t.get('crop_stage_ms_per_crop'))} ms/crop over {t['crop_tasks']} tasks; first crop "
                      f"block {_fmt(t.get('seconds_first_crop_block'), '.2f')} s; pose actor ready "
                      f"{_fmt(t.get('seconds_first_crop_to_first_pose'), '.1f')} s after the first crop, busy "
                      f"{_fmt(100 * busy if busy is not None else None, '.0f')}%")
        print(f"raypose stages: {stages} at {_fmt(t.get('pose_crops_per_busy_second'), '.2f')} crops/busy-s "
              f"(threads {t.get('pose_threads')}); from its first batch {_fmt(t.get('crops_per_second_first_pose_to_end'))} "
              f"crops/s to the end; last batch to end {_fmt(t.get('seconds_last_pose_to_end'), '.2f')} s", file=file)
    if main and main.get("cpu_seconds_by_process"):
        parts = ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in main["cpu_seconds_by_process"].items())
        forward = ceil_cpu * main["crops"] if (ceil_cpu := rows.get("ceiling", {}).get("cpu_seconds_per_crop")) else None
        print(f"raypose CPU-s by process (plan, Ray start and pipeline): {parts}; of {main['cpu_seconds_tree']:.1f}"
              + (f", the forward alone at the ceiling's CPU-s per crop {forward:.1f}" if forward else ""), file=file)
    scale = result.get("scale")
    if scale:
        print(f"linearity: {scale['n']} -> {scale['n4']} images: time x{scale['time_ratio']:.2f} for "
              f"x{scale['crops_ratio']:.2f} crops (target <= 4.4), peak PSS x{_fmt(scale.get('pss_ratio'), '.2f')}, "
              f"peak RSS x{_fmt(scale.get('rss_ratio'), '.2f')} (target <= 1.2)", file=file)
        for tag, run in scale["runs"].items():
            cps = run["crops_per_second"]
            print(f"raypose at {scale[tag]} images (Ray warm): {run['crops']} crops, {cps:.2f} crops/s over the pipeline "
                  f"(x reference {_fmt(cps / ref if ref else None, '.2f')}, x ceiling {_fmt(cps / ceil if ceil else None, '.2f')})",
                  file=file)


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import ray
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.images
    inputs = prepare_inputs(args, [n, 4 * n] if args.scale else [n])
    data, checkpoint = inputs["sets"][n], inputs["checkpoint"]
    from raypose.models.routing import resolve_routing

    spec = load_spec(write_job(args, data, checkpoint, out / "runs" / "probe", out / "jobs" / "probe.yaml"),
                     args.overrides)
    routing = resolve_routing(spec.pose)
    expert = routing.experts[routing.default]
    cores = _usable_cores()
    threads = args.ceiling_threads or cores
    torch_threads = torch.get_num_threads()
    ray_was_up = ray.is_initialized()
    # The reference and the ceiling run with the device, dtype and batch size the job's layout
    # resolves on this machine; on CPU the ceiling runs the forward as raypose's pose actors
    # would: that many processes with that many torch threads each (two single-threaded
    # forwards on 2 cores do 7% more than one with two threads). --ceiling-threads N: one process, N threads.
    layout = local_layout(spec, routing, cores, n)
    pose = layout.pose
    gpu = pose.device == "cuda"
    batch_size = pose.batch_size
    ceiling_processes, ceiling_threads = 1, threads
    if not gpu and not args.ceiling_threads:
        ceiling_processes, ceiling_threads = layout.pose_pool.max_actors, pose.threads
    result: dict[str, Any] = {
        "config": {
            "preset": args.preset, "images": n, "image_copies": args.image_copies, "sizes": args.sizes,
            "persons": args.persons,
            "box_heights": args.box_heights, "seed": args.seed, "batch_size": batch_size,
            "dtype": pose.dtype, "device": pose.device, "flip_test": pose.flip_test,
            "resources": spec.resources.model_dump(), "overrides": args.overrides,
            "jpeg_draft": spec.images.jpeg_draft, "ceiling_threads": ceiling_threads,
            "ceiling_processes": ceiling_processes, "reference_threads": threads, "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "machine": machine_info(),
        "inputs": {"seconds": inputs["seconds"], "checkpoint": str(checkpoint), "boxes": str(data["boxes"]),
                   "crops": sum(len(b) for _, b in _coco_images(data["boxes"]))},
        "rows": {},
    }
    rows = result["rows"]
    try:
        with Sampler(args.sample_interval, gpu=gpu, pss_interval=args.pss_interval) as sampler:
            # raypose first: its peak memory is then not inflated by models the driver loaded.
            if "raypose" in args.row_set:
                with sampler.phase("raypose") as stats:
                    main_run = run_raypose(args, data, checkpoint, f"n{n}")
                result["raypose"] = {**main_run, **Sampler.summary(stats)}
                if args.scale:
                    result["scale"] = run_scale(args, inputs, checkpoint, sampler, n)
            if "host" in args.row_set:
                with sampler.phase("host") as stats:
                    host_run = run_raypose(args, data, checkpoint, f"host-n{n}", instant_forward=True)
                result["host"] = {**host_run, **Sampler.summary(stats)}
            # The reference and the ceiling run without Ray's processes beside them, as they
            # would for their users: on 2 cores a Ray left up after a job slowed the ceiling by 13%.
            if not ray_was_up and ray.is_initialized():
                ray.shutdown()
            if "ceiling" in args.row_set:
                with sampler.phase("ceiling") as stats:
                    ceiling = run_ceiling(expert, pose, batch_size, result["inputs"]["crops"],
                                          ceiling_threads if not gpu else None, args.ceiling_min_seconds,
                                          ceiling_processes)
                rows["ceiling"] = {**ceiling, **Sampler.summary(stats, own=ceiling_processes == 1)}
                gc.collect()
            if "reference" in args.row_set:
                with sampler.phase("reference") as stats:
                    reference = run_reference(expert, pose, data, threads)
                rows["reference"] = {**reference, **Sampler.summary(stats, own=True)}
                gc.collect()
    finally:
        torch.set_num_threads(torch_threads)
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()

    # Table order: reference, ceiling, raypose rows.
    ordered = {k: rows[k] for k in ("reference", "ceiling") if k in rows}
    main_run = result.get("raypose")
    if main_run:
        mem = {k: main_run.get(k) for k in ("peak_rss_tree_mib", "peak_pss_tree_mib", "gpu_util_mean_pct",
                                             "gpu_mem_peak_smi_mib")}
        if main_run.get("cpu_seconds_tree") is not None:
            mem["cpu_seconds_per_crop"] = main_run["cpu_seconds_tree"] / max(1, main_run["crops"])
        gpu_torch = main_run.get("trace", {}).get("gpu_mem_peak_torch_mib")
        ordered["raypose"] = {"crops": main_run["crops"], "seconds": main_run["seconds"]["pipeline"],
                              "crops_per_second": main_run["crops_per_second"], **mem,
                              "gpu_mem_peak_torch_mib": gpu_torch}
        ordered["raypose incl. plan + Ray start"] = {
            "crops": main_run["crops"], "seconds": main_run["seconds"]["end_to_end"],
            "crops_per_second": main_run["crops_per_second_with_start"], **mem}
        if "crops_per_second_from_first_crop" in main_run:
            ordered["raypose first crop -> end"] = {
                "crops": main_run["crops"], "seconds": main_run["trace"]["seconds_first_crop_to_end"],
                "crops_per_second": main_run["crops_per_second_from_first_crop"], **mem}
    host_run = result.get("host")
    if host_run:
        cpu = host_run.get("cpu_seconds_tree")
        ordered["host (forward a stand-in)"] = {
            "crops": host_run["crops"], "seconds": host_run["seconds"]["pipeline"],
            "crops_per_second": host_run["crops_per_second"],
            "cpu_seconds_per_crop": cpu / max(1, host_run["crops"]) if cpu is not None else None,
            "peak_rss_tree_mib": host_run.get("peak_rss_tree_mib"), "peak_pss_tree_mib": host_run.get("peak_pss_tree_mib")}
    result["rows"] = ordered
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = os.getloadavg()
    ref = ordered.get("reference", {}).get("crops_per_second")
    ceil = ordered.get("ceiling", {}).get("crops_per_second")
    for row in ordered.values():
        cps = row.get("crops_per_second")
        row["x_reference"] = cps / ref if cps and ref else None
        row["x_ceiling"] = cps / ceil if cps and ceil else None
    print_table(result)
    json_path = Path(args.json_path) if args.json_path else out / "throughput.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    print(f"json: {json_path}")
    return result


def local_layout(spec, routing, cores: int, images: int):
    """The job's layout on this machine as an embedded Ray sees it: its GPUs and its cores."""
    import torch

    from raypose.pipeline.layout import ClusterShape, resolve_layout
    from raypose.pipeline.runtime import cpu_has_native_bf16

    cuda = torch.cuda.is_available()
    cluster = ClusterShape(gpus=float(torch.cuda.device_count()) if cuda else 0.0, node_cpus=cores,
                           bf16=torch.cuda.is_bf16_supported() if cuda else None, cpu_bf16=cpu_has_native_bf16())
    return resolve_layout(spec, routing, cluster, images)


def _ratio(a, b):
    return a / b if a and b else None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
    if sys.argv[1:2] == ["--ceiling-worker"]:
        _ceiling_worker(json.loads(sys.argv[2]))
    else:
        main()
