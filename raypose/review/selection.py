"""Which images a review tool shows: instance filters (score range, expert, category), an order, a sample."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pyarrow.compute as pc
import pyarrow.dataset as ds

from raypose.review.reading import JobOutput, OutputError

ORDERS = ("worst", "best", "name", "random")
# What "worst" and the score range go by: a column, and whether low (True) or high is bad.
SCORES = {"instance_score": True, "flip_oks": True, "instance_doubt": False}


@dataclass(frozen=True)
class Selection:
    """Which images to show: instance filters, then `order`, then the first `sample`."""

    sample: int = 50
    order: str = "worst"
    min_score: float | None = None  # an image is shown when one of its instances scores in [min, max]
    max_score: float | None = None
    expert: str | None = None
    category: str | None = None
    seed: int = 0  # for order random
    by: str = "instance_score"  # the score `order` and [min_score, max_score] go by (SCORES)

    def check(self) -> None:
        """OutputError naming the option that is out of range."""
        if self.sample < 1:
            raise OutputError(f"--sample: expected a positive number of images, got {self.sample}")
        if self.order not in ORDERS:
            raise OutputError(f"--order: expected one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.by not in SCORES:
            raise OutputError(f"--by: expected one of {', '.join(SCORES)}, got {self.by!r}")

    def describe(self) -> str:
        by = "" if self.by == "instance_score" else f" by {self.by}"
        parts = [f"{self.order} first{by}" if self.order in ("worst", "best") else f"order {self.order}"]
        if self.min_score is not None or self.max_score is not None:
            parts.append(f"{self.by.replace('_', ' ')} in [{self.min_score if self.min_score is not None else '-inf'}, "
                         f"{self.max_score if self.max_score is not None else 'inf'}]")
        parts += [f"{name} {value}" for name, value in (("expert", self.expert), ("category", self.category)) if value]
        if self.order == "random":
            parts.append(f"seed {self.seed}")
        return ", ".join(parts)


def choose_images(job: JobOutput, selection: Selection) -> tuple[list[str], int]:
    """The keys to draw, in page order, and how many images matched the filters."""
    dataset = job.dataset()
    if dataset is None:
        return [], 0
    if selection.by not in dataset.schema.names:
        raise OutputError(f"--by {selection.by}: the output has no such column (made before it existed)")
    table = dataset.to_table(columns=["image_key", selection.by, "expert", "category"])
    if selection.by != "instance_score" and table.num_rows and table.column(selection.by).null_count == table.num_rows:
        raise OutputError(f"--by {selection.by}: the output has none (the job ran without pose.uncertainty: flip)")
    keep = pc.is_valid(table.column("image_key"))
    for name, value in (("expert", selection.expert), ("category", selection.category)):
        if value is not None:
            keep = pc.and_(keep, pc.equal(table.column(name), value))
    score = pc.fill_null(table.column(selection.by), float("nan"))
    if selection.min_score is not None:
        keep = pc.and_(keep, pc.greater_equal(score, selection.min_score))
    if selection.max_score is not None:
        keep = pc.and_(keep, pc.less_equal(score, selection.max_score))
    kept = table.filter(keep)
    # "trust": low is bad whatever the column, so worst first is lowest first
    trust = kept.column(selection.by) if SCORES[selection.by] else pc.negate(kept.column(selection.by))
    per_image = kept.append_column("trust", trust).group_by("image_key").aggregate([("trust", "min"), ("trust", "max")])
    keys = per_image.column("image_key").to_pylist()
    lowest = per_image.column("trust_min").to_pylist()
    highest = per_image.column("trust_max").to_pylist()
    missing = math.inf
    if selection.order == "worst":
        order = sorted(range(len(keys)), key=lambda i: (lowest[i] if lowest[i] is not None else missing, keys[i]))
    elif selection.order == "best":
        order = sorted(range(len(keys)), key=lambda i: (-(highest[i] if highest[i] is not None else -missing), keys[i]))
    elif selection.order == "name":
        order = sorted(range(len(keys)), key=lambda i: keys[i])
    else:
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        random.Random(selection.seed).shuffle(order)
    return [keys[i] for i in order[: selection.sample]], len(keys)


def rows_of(job: JobOutput, keys: list[str], columns: list[str]) -> dict[str, list[dict]]:
    """Every instance row of these images, by key, in instance order; a column an older output lacks (the flip
    columns, the video frame columns) is None in every row."""
    rows_by_key: dict[str, list[dict]] = {k: [] for k in keys}
    if keys:
        dataset = job.dataset()
        held = [c for c in columns if c in dataset.schema.names]
        absent = dict.fromkeys(c for c in columns if c not in held)
        table = dataset.to_table(columns=held, filter=ds.field("image_key").isin(keys))
        for row in table.to_pylist():
            rows_by_key[row["image_key"]].append({**row, **absent})
    for rows in rows_by_key.values():
        rows.sort(key=lambda r: r["instance_index"] if r["instance_index"] is not None else -1)
    return rows_by_key
