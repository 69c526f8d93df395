"""Which images a review tool shows: instance filters (score range, expert, category), an order, a sample."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pyarrow.compute as pc

from raypose.review.reading import JobOutput

ORDERS = ("worst", "best", "name", "random")


@dataclass(frozen=True)
class Selection:
    """Which images to draw: instance filters, then `order`, then the first `sample`."""

    sample: int = 50
    order: str = "worst"
    min_score: float | None = None  # an image is shown when one of its instances scores in [min, max]
    max_score: float | None = None
    expert: str | None = None
    category: str | None = None
    seed: int = 0  # for order random

    def describe(self) -> str:
        parts = [f"{self.order} first" if self.order in ("worst", "best") else f"order {self.order}"]
        if self.min_score is not None or self.max_score is not None:
            parts.append(f"instance score in [{self.min_score if self.min_score is not None else '-inf'}, "
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
    table = dataset.to_table(columns=["image_key", "instance_score", "expert", "category"])
    keep = pc.is_valid(table.column("image_key"))
    for name, value in (("expert", selection.expert), ("category", selection.category)):
        if value is not None:
            keep = pc.and_(keep, pc.equal(table.column(name), value))
    score = pc.fill_null(table.column("instance_score"), float("nan"))
    if selection.min_score is not None:
        keep = pc.and_(keep, pc.greater_equal(score, selection.min_score))
    if selection.max_score is not None:
        keep = pc.and_(keep, pc.less_equal(score, selection.max_score))
    per_image = table.filter(keep).group_by("image_key").aggregate(
        [("instance_score", "min"), ("instance_score", "max")])
    keys = per_image.column("image_key").to_pylist()
    lowest = per_image.column("instance_score_min").to_pylist()
    highest = per_image.column("instance_score_max").to_pylist()
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
