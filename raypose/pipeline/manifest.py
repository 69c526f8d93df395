"""The job manifest: what a finished run did (counts, timings, throughput, layout, versions), written last."""

from __future__ import annotations

import platform
from collections import Counter
from typing import Any

from raypose import __version__
from raypose.output.resume import fingerprint, iso_time
from raypose.pipeline.layout import Layout
from raypose.pipeline.plan import JobPlan


def job_counts(plan: JobPlan, committed: dict[int, dict]) -> dict[str, Any]:
    """The plan's counts plus what the shards (reused and written now) hold: instances, errors by stage."""
    markers = {**plan.shards.reused, **committed}
    errors_by_stage = Counter(plan.missing.column("stage").to_pylist())
    for marker in markers.values():
        errors_by_stage.update(marker["errors_by_stage"])
    counts = {**plan.counts, "images": sum(m["images"] for m in markers.values()),
              "images_this_run": sum(m["images"] for m in committed.values()),
              "instances": sum(m["instances"] for m in markers.values()),
              "errors": sum(errors_by_stage.values()), "errors_by_stage": dict(errors_by_stage),
              "instances_this_run": sum(m["instances"] for m in committed.values())}
    if plan.detector is not None:
        counts["images_without_detections"] = sum(m["images_without_boxes"] for m in markers.values())
    return counts


def job_status(counts: dict[str, Any], max_errored_fraction: float) -> tuple[str, str | None]:
    """succeeded, or failed with the reason: every input failed, or too many rows failed."""
    instances, errors = counts["instances"], counts["errors"]
    if not instances and errors:
        return "failed", "every input failed"
    errored = errors / max(1, errors + instances)
    if errored > max_errored_fraction:
        return "failed", f"{errored:.1%} of the rows failed, above limits.max_errored_fraction ({max_errored_fraction:.1%})"
    return "succeeded", None


def actors_ran(crops_by_worker: dict[str, int]) -> dict[str, Any]:
    """The pose actors that made this run's rows, by node: how many, and their crops."""
    nodes: dict[str, dict[str, int]] = {}
    for worker, crops in sorted(crops_by_worker.items()):
        node = nodes.setdefault(worker.rsplit(":", 1)[0], {"actors": 0, "crops": 0})
        node["actors"] += 1
        node["crops"] += crops
    return {"pose_actors": len(crops_by_worker), "nodes": nodes}


def job_manifest(plan: JobPlan, layout: Layout, committed: dict[int, dict], key: dict[str, Any],
                 times: dict[str, float], crops_by_worker: dict[str, int]) -> dict[str, Any]:
    """manifest.json: `times` has started, ray_ready and finished (epoch seconds)."""
    spec, routing, detector = plan.spec, plan.routing, plan.detector
    counts = job_counts(plan, committed)
    status, problem = job_status(counts, spec.limits.max_errored_fraction)
    pipeline = times["finished"] - times["ray_ready"]
    markers = {**plan.shards.reused, **committed}
    files = sorted(f for m in markers.values() for f in m["files"])
    return {
        "job_id": plan.job_id,
        "name": spec.name,
        "status": status,
        "problem": problem,
        "started_at": iso_time(times["started"]),
        "finished_at": iso_time(times["finished"]),
        "seconds": {"total": times["finished"] - times["started"], "ray_start": times["ray_ready"] - times["started"],
                    "pipeline": pipeline},
        "throughput": {
            "crops_per_second": counts["instances_this_run"] / pipeline if pipeline > 0 else 0.0,
            "images_per_second": plan.images / pipeline if pipeline > 0 else 0.0,
        },
        "counts": counts,
        "shards": {"total": plan.shards.num_shards, "reused": len(plan.shards.reused), "written": len(committed)},
        "experts": {
            name: {"model": e.model.model_id, "revision": e.model.revision, "dataset_index": e.dataset_index,
                   "keypoint_schema": e.keypoint_schema, "input_size": list(e.input_size)}
            for name, e in routing.experts.items()
        },
        "routing": {"rules": routing.rules, "default": routing.default},
        "detector": {"model": detector.model_id, "revision": detector.revision} if detector else None,
        "layout": {**layout.describe(), "ran": actors_ran(crops_by_worker)},
        "files": {"keypoints": [f for f in files if "/keypoints/" in f], "errors": [f for f in files if "/errors/" in f]},
        "spec": spec.redacted(),
        "spec_fingerprint": spec.fingerprint(),
        "result_fingerprint": fingerprint(key),
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import transformers

    return {
        "raypose": __version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }
