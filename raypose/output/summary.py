"""`raypose inspect`: what a job did, from its manifest.json and its Parquet tables.

The counts that the Parquet can tell (instances, images with instances, errors by stage and
reason, keypoint score histograms) are computed from the Parquet, batch by batch; the rest
(status, model, durations, throughput, spec) comes from the manifest. Where the manifest and
the Parquet disagree the summary says so under `warnings`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc
import yaml

from raypose.output.reading import JobOutput
from raypose.output.writer import ERRORS_DIR

# Histogram bin edges over keypoint scores; scores below 0 count in the first bin, above 1 in the last.
SCORE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
TOP_REASONS = 10


def summarize(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job's summary as plain JSON data."""
    job = JobOutput.open(output, storage_options)
    manifest = job.manifest or {}
    counts = manifest.get("counts", {})

    instances = 0
    images: set[str] = set()
    instance_scores: list[np.ndarray] = []
    per_schema: dict[str, dict[str, Any]] = {}
    categories: Counter[str] = Counter()
    experts: Counter[str] = Counter()
    columns = ["image_key", "category", "expert", "keypoint_schema", "keypoint_score", "instance_score"]
    for batch in job.batches(columns):
        instances += batch.num_rows
        categories.update(batch.column("category").to_pylist())
        experts.update(batch.column("expert").to_pylist())
        images.update(batch.column("image_key").to_pylist())
        instance_scores.append(batch.column("instance_score").to_numpy(zero_copy_only=False).astype(np.float64))
        schemas = batch.column("keypoint_schema")
        for name in pc.unique(schemas).to_pylist():
            rows = batch.filter(pc.equal(schemas, name)) if name is not None else batch.filter(pc.is_null(schemas))
            scores = rows.column("keypoint_score")
            lengths = pc.list_value_length(scores).to_numpy(zero_copy_only=False)
            width = int(lengths.max()) if len(lengths) else 0
            if width == 0 or (lengths != width).any():
                continue  # a ragged list would be a writer bug; the stats skip it rather than guess
            values = pc.list_flatten(scores).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, width)
            acc = per_schema.setdefault(
                str(name), {"instances": 0, "sum": np.zeros(width), "finite": np.zeros(width, np.int64),
                            "hist": np.zeros((width, len(SCORE_BINS) - 1), np.int64)}
            )
            if acc["sum"].shape[0] != width:
                continue
            finite = np.isfinite(values)
            acc["instances"] += values.shape[0]
            acc["sum"] += np.where(finite, values, 0.0).sum(axis=0)
            acc["finite"] += finite.sum(axis=0)
            clipped = np.clip(values, SCORE_BINS[0], SCORE_BINS[-1])
            bins = np.clip(np.searchsorted(SCORE_BINS, clipped, side="right") - 1, 0, len(SCORE_BINS) - 2)
            for k in range(width):
                acc["hist"][k] += np.bincount(bins[finite[:, k], k], minlength=len(SCORE_BINS) - 1)

    stages: Counter[str] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    errors = 0
    for batch in job.batches(["stage", "reason"], table=ERRORS_DIR):
        errors += batch.num_rows
        for stage, reason in zip(batch.column("stage").to_pylist(), batch.column("reason").to_pylist()):
            stages[stage] += 1
            reasons[(stage, reason)] += 1

    keypoint_scores = {}
    for name, acc in sorted(per_schema.items()):
        names = list(job.schemas.get(name, {}).get("keypoints") or [f"k{i}" for i in range(len(acc["sum"]))])
        keypoint_scores[name] = {
            "instances": acc["instances"],
            "bins": list(SCORE_BINS),
            "keypoints": [
                {
                    "index": k,
                    "name": names[k] if k < len(names) else f"k{k}",
                    "mean": float(acc["sum"][k] / acc["finite"][k]) if acc["finite"][k] else None,
                    "histogram": [int(v) for v in acc["hist"][k]],
                }
                for k in range(len(acc["sum"]))
            ],
        }
    all_instance_scores = np.concatenate(instance_scores) if instance_scores else np.zeros(0)
    all_instance_scores = all_instance_scores[np.isfinite(all_instance_scores)]

    warnings = []
    if not job.complete:
        warnings.append("no manifest.json: the job did not finish (or is still running); counts are what is on disk")
    for key, found in (("instances", instances), ("errors", errors)):
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
        "counts": {
            "images_with_instances": len(images),
            "instances": instances,
            "errors": errors,
        },
        "instances_by": {
            "category": dict(categories.most_common()),
            "expert": dict(experts.most_common()),
        },
        # what the job planned and counted (manifest.json), as it says
        "job_counts": {k: v for k, v in counts.items() if not isinstance(v, (dict, list))},
        "errors_by_stage": dict(stages.most_common()),
        "top_error_reasons": [{"stage": s, "reason": r, "count": n} for (s, r), n in reasons.most_common(TOP_REASONS)],
        "instance_score": {
            "mean": float(all_instance_scores.mean()) if all_instance_scores.size else None,
            "median": float(np.median(all_instance_scores)) if all_instance_scores.size else None,
        },
        "keypoint_scores": keypoint_scores,
        "throughput": manifest.get("throughput", {}),
        "seconds": manifest.get("seconds", {}),
        "versions": manifest.get("versions", {}),
        "spec": manifest.get("spec"),
        "warnings": warnings,
    }


def format_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=False, default=str)


def format_text(summary: dict[str, Any]) -> str:
    """The summary as aligned plain-text tables."""
    out: list[str] = []
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
    out += _kv(head)
    out.append("")
    out.append("experts")
    out += _table(
        ["expert", "model", "revision", "keypoint schema", "input", "instances"],
        [[name, e.get("model") or "?", e.get("revision") or "?", e.get("keypoint_schema") or "?",
          "x".join(str(v) for v in e["input_size"]) if e.get("input_size") else "?",
          str(summary["instances_by"]["expert"].get(name, 0))]
         for name, e in summary["experts"].items()],
        indent=2,
    )
    out.append("")
    c, job_counts = summary["counts"], summary["job_counts"]
    rows = [[k.replace("_", " "), _int(v), _int(c.get(k))] for k, v in job_counts.items()]
    rows += [[k.replace("_", " "), "-", _int(v)] for k, v in c.items() if k not in job_counts]
    rows += [[f"instances: {cat}", "-", str(n)] for cat, n in summary["instances_by"]["category"].items()]
    out.append("counts")
    out += _table(["", "manifest", "parquet"], rows, indent=2)
    inst = summary["instance_score"]
    out.append(f"  instance score: mean {_num(inst['mean'], 3)}, median {_num(inst['median'], 3)}")
    out.append("")
    if summary["errors_by_stage"]:
        out.append("errors by stage")
        out += _table(["stage", "count"], [[s, str(n)] for s, n in summary["errors_by_stage"].items()], indent=2)
        out.append("top error reasons")
        out += _table(
            ["count", "stage", "reason"],
            [[str(e["count"]), e["stage"], _clip(e["reason"], 90)] for e in summary["top_error_reasons"]],
            indent=2,
        )
    else:
        out.append("errors: none")
    for name, schema in summary["keypoint_scores"].items():
        out.append("")
        bins = schema["bins"]
        labels = [f"<{bins[1]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(bins[1:-2], bins[2:-1])] + [f">={bins[-2]:g}"]
        n = schema["instances"]
        out.append(f"keypoint scores: {name} ({n} instance{'' if n == 1 else 's'}; instances per score bin)")
        out += _table(
            ["#", "keypoint", "mean"] + labels,
            [[str(k["index"]), k["name"], _num(k["mean"], 3)] + [str(v) for v in k["histogram"]]
             for k in schema["keypoints"]],
            indent=2,
        )
    if summary["warnings"]:
        out.append("")
        out.append("warnings")
        out += [f"  ! {w}" for w in summary["warnings"]]
    if summary["spec"] is not None:
        out.append("")
        out.append("spec (credentials redacted)")
        spec = yaml.safe_dump(summary["spec"], sort_keys=False, default_flow_style=False).rstrip()
        out += [f"  {line}" for line in spec.splitlines()]
    return "\n".join(out) + "\n"


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
