"""`raypose inspect`: what a job did, from its manifest.json and its Parquet tables.

The counts that the Parquet can tell (instances, images with instances, errors by stage and
reason, keypoint score histograms) are computed from the Parquet, batch by batch; the rest
(status, model, durations, throughput, spec) comes from the manifest. Where the manifest and
the Parquet disagree the summary says so under `warnings`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
import yaml

from raypose.output.writer import ERRORS_DIR
from raypose.review.corrections import review_summary
from raypose.review.reading import JobOutput

# Histogram bin edges over keypoint scores; scores below 0 count in the first bin, above 1 in the last.
SCORE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
TOP_REASONS = 10


def summarize(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job's summary as plain JSON data."""
    job = JobOutput.open(output, storage_options)
    manifest = job.manifest or {}
    counts = manifest.get("counts", {})
    instances = _InstanceStats.of(job)
    errors = _ErrorStats.of(job)
    scores = instances.scores[np.isfinite(instances.scores)]
    warnings = []
    if not job.complete:
        warnings.append("no manifest.json: the job did not finish (or is still running); counts are what is on disk")
    for key, found in (("instances", instances.count), ("errors", errors.count)):
        if key in counts and counts[key] != found:
            warnings.append(f"manifest says {counts[key]} {key}, the Parquet holds {found}")
    return {
        "output": job.url,
        "job_id": manifest.get("job_id"),
        "name": manifest.get("name"),
        "status": manifest.get("status", "incomplete"),
        "started_at": manifest.get("started_at"),
        "finished_at": manifest.get("finished_at"),
        "experts": job.experts,
        "detector": manifest.get("detector"),
        # what the Parquet holds, counted here
        "counts": {"images_with_instances": len(instances.images), "instances": instances.count, "errors": errors.count},
        "instances_by": {
            "category": dict(instances.categories.most_common()),
            "expert": dict(instances.experts.most_common()),
        },
        # what the job planned and counted (manifest.json), as it says
        "job_counts": {k: v for k, v in counts.items() if not isinstance(v, (dict, list))},
        "errors_by_stage": dict(errors.stages.most_common()),
        "top_error_reasons": [{"stage": s, "reason": r, "count": n}
                              for (s, r), n in errors.reasons.most_common(TOP_REASONS)],
        "instance_score": {
            "mean": float(scores.mean()) if scores.size else None,
            "median": float(np.median(scores)) if scores.size else None,
        },
        "keypoint_scores": instances.keypoint_scores(job.schemas),
        "review": review_summary(job),  # corrections imported from labeling tools (raypose import), or None
        "runs": job.runs(),  # every run that built the output: job id, mode, times, status, what it added
        "throughput": manifest.get("throughput", {}),
        "seconds": manifest.get("seconds", {}),
        "versions": manifest.get("versions", {}),
        "spec": manifest.get("spec"),
        "warnings": warnings,
    }


@dataclass
class _InstanceStats:
    """What the keypoints table holds, read batch by batch: counts, instance scores, per-keypoint score stats."""

    count: int = 0
    images: set = field(default_factory=set)
    categories: Counter = field(default_factory=Counter)
    experts: Counter = field(default_factory=Counter)
    batch_scores: list = field(default_factory=list)
    per_schema: dict = field(default_factory=dict)  # schema -> instances, sum, finite, hist per keypoint

    @classmethod
    def of(cls, job: JobOutput) -> "_InstanceStats":
        stats = cls()
        for batch in job.batches(["image_key", "category", "expert", "keypoint_schema", "keypoint_score",
                                  "instance_score"]):
            stats.add(batch)
        return stats

    @property
    def scores(self) -> np.ndarray:
        return np.concatenate(self.batch_scores) if self.batch_scores else np.zeros(0)

    def add(self, batch) -> None:
        self.count += batch.num_rows
        self.categories.update(batch.column("category").to_pylist())
        self.experts.update(batch.column("expert").to_pylist())
        self.images.update(batch.column("image_key").to_pylist())
        self.batch_scores.append(batch.column("instance_score").to_numpy(zero_copy_only=False).astype(np.float64))
        schemas = batch.column("keypoint_schema")
        for name in pc.unique(schemas).to_pylist():
            rows = batch.filter(pc.equal(schemas, name)) if name is not None else batch.filter(pc.is_null(schemas))
            self._add_keypoint_scores(str(name), rows.column("keypoint_score"))

    def _add_keypoint_scores(self, name: str, scores) -> None:
        lengths = pc.list_value_length(scores).to_numpy(zero_copy_only=False)
        width = int(lengths.max()) if len(lengths) else 0
        if width == 0 or (lengths != width).any():
            return  # a ragged list would be a writer bug; the stats skip it rather than guess
        values = pc.list_flatten(scores).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, width)
        acc = self.per_schema.setdefault(name, {"instances": 0, "sum": np.zeros(width), "finite": np.zeros(width, np.int64),
                                                "hist": np.zeros((width, len(SCORE_BINS) - 1), np.int64)})
        if acc["sum"].shape[0] != width:
            return
        finite = np.isfinite(values)
        acc["instances"] += values.shape[0]
        acc["sum"] += np.where(finite, values, 0.0).sum(axis=0)
        acc["finite"] += finite.sum(axis=0)
        clipped = np.clip(values, SCORE_BINS[0], SCORE_BINS[-1])
        bins = np.clip(np.searchsorted(SCORE_BINS, clipped, side="right") - 1, 0, len(SCORE_BINS) - 2)
        for k in range(width):
            acc["hist"][k] += np.bincount(bins[finite[:, k], k], minlength=len(SCORE_BINS) - 1)

    def keypoint_scores(self, schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Per schema: instances, the score bins, and per keypoint (named) its mean score and histogram."""
        out = {}
        for name, acc in sorted(self.per_schema.items()):
            names = list(schemas.get(name, {}).get("keypoints") or [f"k{i}" for i in range(len(acc["sum"]))])
            out[name] = {
                "instances": acc["instances"],
                "bins": list(SCORE_BINS),
                "keypoints": [
                    {"index": k, "name": names[k] if k < len(names) else f"k{k}",
                     "mean": float(acc["sum"][k] / acc["finite"][k]) if acc["finite"][k] else None,
                     "histogram": [int(v) for v in acc["hist"][k]]}
                    for k in range(len(acc["sum"]))
                ],
            }
        return out


@dataclass
class _ErrorStats:
    """What the errors table holds: counts by stage and by (stage, reason)."""

    count: int = 0
    stages: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, job: JobOutput) -> "_ErrorStats":
        stats = cls()
        for batch in job.batches(["stage", "reason"], table=ERRORS_DIR):
            stats.count += batch.num_rows
            for stage, reason in zip(batch.column("stage").to_pylist(), batch.column("reason").to_pylist()):
                stats.stages[stage] += 1
                stats.reasons[(stage, reason)] += 1
        return stats


def format_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=False, default=str)


def format_text(summary: dict[str, Any]) -> str:
    """The summary as aligned plain-text tables."""
    sections = [_head_lines(summary), _expert_lines(summary), _count_lines(summary), _error_lines(summary)]
    if summary.get("runs"):
        sections.append(_run_lines(summary["runs"]))
    sections += [_keypoint_score_lines(name, schema) for name, schema in summary["keypoint_scores"].items()]
    if summary.get("review"):
        sections.append(_review_lines(summary["review"]))
    if summary["warnings"]:
        sections.append(["warnings"] + [f"  ! {w}" for w in summary["warnings"]])
    if summary["spec"] is not None:
        spec = yaml.safe_dump(summary["spec"], sort_keys=False, default_flow_style=False).rstrip()
        sections.append(["spec (credentials redacted)"] + [f"  {line}" for line in spec.splitlines()])
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _head_lines(summary: dict[str, Any]) -> list[str]:
    secs = summary["seconds"] or {}
    tput = summary["throughput"] or {}
    head = [
        ("job", f"{summary['job_id'] or '?'}  ({summary['status']})"),
        ("name", summary["name"] or "?"),
        ("output", summary["output"]),
        ("started", f"{summary['started_at'] or '?'}   finished {summary['finished_at'] or '?'}"),
        ("duration", _seconds(secs)),
        ("throughput", f"{_num(tput.get('crops_per_second'))} crops/s, {_num(tput.get('images_per_second'))} images/s"),
    ]
    detector = summary.get("detector")
    if detector:
        head.append(("detector", f"{detector.get('model', '?')} @ {detector.get('revision', '?')}"))
    return _kv(head)


def _expert_lines(summary: dict[str, Any]) -> list[str]:
    return ["experts"] + _table(
        ["expert", "model", "revision", "keypoint schema", "input", "instances"],
        [[name, e.get("model") or "?", e.get("revision") or "?", e.get("keypoint_schema") or "?",
          "x".join(str(v) for v in e["input_size"]) if e.get("input_size") else "?",
          str(summary["instances_by"]["expert"].get(name, 0))]
         for name, e in summary["experts"].items()],
        indent=2,
    )


def _count_lines(summary: dict[str, Any]) -> list[str]:
    c, job_counts = summary["counts"], summary["job_counts"]
    rows = [[k.replace("_", " "), _int(v), _int(c.get(k))] for k, v in job_counts.items()]
    rows += [[k.replace("_", " "), "-", _int(v)] for k, v in c.items() if k not in job_counts]
    rows += [[f"instances: {cat}", "-", str(n)] for cat, n in summary["instances_by"]["category"].items()]
    inst = summary["instance_score"]
    return (["counts"] + _table(["", "manifest", "parquet"], rows, indent=2)
            + [f"  instance score: mean {_num(inst['mean'], 3)}, median {_num(inst['median'], 3)}"])


def _run_lines(runs: list[dict[str, Any]]) -> list[str]:
    return ["runs"] + _table(
        ["job", "mode", "started", "finished", "status", "images", "instances", "superseded"],
        [[r.get("job_id") or "?", r.get("mode") or "?", r.get("started_at") or "?", r.get("finished_at") or "-",
          r.get("status") or "?", _int(r.get("images")), _int(r.get("instances")), _int(r.get("superseded"))]
         for r in runs],
        indent=2,
    )


def _error_lines(summary: dict[str, Any]) -> list[str]:
    if not summary["errors_by_stage"]:
        return ["errors: none"]
    return (["errors by stage"]
            + _table(["stage", "count"], [[s, str(n)] for s, n in summary["errors_by_stage"].items()], indent=2)
            + ["top error reasons"]
            + _table(["count", "stage", "reason"],
                     [[str(e["count"]), e["stage"], _clip(e["reason"], 90)] for e in summary["top_error_reasons"]],
                     indent=2))


def _keypoint_score_lines(name: str, schema: dict[str, Any]) -> list[str]:
    bins = schema["bins"]
    labels = [f"<{bins[1]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(bins[1:-2], bins[2:-1])] + [f">={bins[-2]:g}"]
    n = schema["instances"]
    return [f"keypoint scores: {name} ({n} instance{'' if n == 1 else 's'}; instances per score bin)"] + _table(
        ["#", "keypoint", "mean"] + labels,
        [[str(k["index"]), k["name"], _num(k["mean"], 3)] + [str(v) for v in k["histogram"]] for k in schema["keypoints"]],
        indent=2,
    )


def _review_lines(review: dict[str, Any]) -> list[str]:
    stale = f"; {review['stale']} corrections of images relabelled since left out" if review["stale"] else ""
    lines = [f"review: {review['reviewed']} instances reviewed, {review['deleted']} deleted, {review['added']} added "
             f"({', '.join(review['reviewers']) or 'reviewer unknown'}){stale}"]
    for name, schema in review["by_schema"].items():
        lines += [f"  mean correction per keypoint, {name} ({schema['instances']} instances)"] + _table(
            ["keypoint", "labelled", "pixels", "of box"],
            [[k["name"], str(k["labelled"]), _num(k["mean_pixels"]), _num(k["mean_fraction_of_box"], 3)]
             for k in schema["keypoints"]], indent=4)
    return lines


def _kv(pairs: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{k.ljust(width)}  {v}" for k, v in pairs]


def _table(header: list[str], rows: list[list[str]], indent: int = 0) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    pad = " " * indent

    def line(cells):
        # text columns left-aligned, numbers right-aligned
        parts = [str(c).rjust(w) if _numeric(c) else str(c).ljust(w) for c, w in zip(cells, widths)]
        return (pad + "  ".join(parts)).rstrip()

    return [line(header), pad + "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def _numeric(cell: Any) -> bool:
    text = str(cell)
    return text in ("-",) or text.replace(".", "", 1).replace("-", "", 1).isdigit()


def _seconds(secs: dict[str, Any]) -> str:
    if not secs:
        return "?"
    parts = [f"total {_num(secs.get('total'))} s"]
    extra = [f"{k.replace('_', ' ')} {_num(v)} s" for k, v in secs.items() if k != "total"]
    return parts[0] + (f" ({', '.join(extra)})" if extra else "")


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _int(value: Any) -> str:
    return "-" if value is None else str(value)


def _clip(text: str | None, n: int) -> str:
    text = "" if text is None else " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"
