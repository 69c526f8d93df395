"""`raypose render`: a job's images with their boxes and skeletons drawn, chosen for review, and a QA page.

Images are chosen from the keypoints table (filtered by expert, category and instance score)
and ordered worst first by their lowest instance score (or best first, by name, or at random);
each is drawn with PIL.ImageDraw on the decoded image (EXIF orientation applied, as the job saw
it): every instance in a colour of its own (box, label, skeleton), the skeleton's left side
lighter and its right side darker, keypoints and limbs above `keypoint_threshold`. The pictures
go to `images/<safe name>.jpg` with a thumbnail in `thumbs/`; `qa_page.py` writes index.html,
a page per image, and the list of images that failed.

Images are read from the table's `image_uri`, or from `--images ROOT` + image_key when the
images have moved (or are mounted elsewhere). File names are derived from image keys but
sanitized: only `[A-Za-z0-9._-]`, no leading dots, bounded length, plus a hash of the key
so two keys never collide; nothing is ever written outside `--out`.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
import posixpath
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds
from PIL import Image, ImageDraw, ImageFont

from raypose.errors import ImageError
from raypose.imaging.decode import decode_image
from raypose.inputs.fetch import read_bytes
from raypose.output.reading import JobOutput, OutputError, open_fs

COLUMNS = [
    "image_key", "image_uri", "image_width", "image_height", "instance_index", "bbox", "keypoint_schema",
    "keypoint_x", "keypoint_y", "keypoint_score", "instance_score", "category", "expert",
]  # fmt: skip
ORDERS = ("worst", "best", "name", "random")
THUMB_SIZE = 320
LABEL_PIXELS_IN_THUMB = 12  # a label's height in a thumbnail: readable at thumbnail size
MAX_PIXELS = 100_000_000
JPEG_QUALITY = 90


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


@dataclass
class Rendered:
    image_key: str
    file: str | None  # relative to --out
    thumb: str | None
    instances: int
    mean_instance_score: float | None
    mean_keypoint_score: float | None
    keypoints_drawn: int
    source: str
    problem: str | None = None
    size: tuple[int, int] | None = None
    lowest_score: float | None = None
    rows: list[dict] = field(default_factory=list, repr=False)  # the image's instances, as drawn
    colours: list[tuple[int, int, int]] = field(default_factory=list, repr=False)  # one per instance


def render_output(
    output: str,
    out: str,
    *,
    images: str | None = None,
    selection: Selection = Selection(),
    keypoint_threshold: float = 0.3,
    storage_options: dict[str, Any] | None = None,
    workers: int = 4,
) -> list[Rendered]:
    """Draw the chosen images of a job into `out` (local path or URL), write the QA page; return what was rendered."""
    from raypose.output.qa_page import write_pages

    if selection.sample < 1:
        raise OutputError(f"--sample: expected a positive number of images, got {selection.sample}")
    if selection.order not in ORDERS:
        raise OutputError(f"--order: expected one of {', '.join(ORDERS)}, got {selection.order!r}")
    job = JobOutput.open(output, storage_options)
    chosen, matching = choose_images(job, selection)
    rows_by_key = _rows_of(job, chosen)
    out_fs, out_root = open_fs(out, storage_options, "--out")
    try:
        for folder in ("images", "thumbs", "view"):
            out_fs.makedirs(posixpath.join(out_root, folder), exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out: cannot create {out}: {type(exc).__name__}: {exc}") from exc
    names = unique_names(chosen)

    def work(key: str) -> Rendered:
        return _render_one(job, key, rows_by_key[key], names[key], images, keypoint_threshold,
                           storage_options or {}, out_fs, out_root)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rendered = list(pool.map(work, chosen))
    write_pages(rendered, job, out_fs, out_root, names, selection=selection, matching=matching,
                keypoint_threshold=keypoint_threshold)
    return rendered


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


def _rows_of(job: JobOutput, keys: list[str]) -> dict[str, list[dict]]:
    """Every instance row of the chosen images, by key, in instance order."""
    rows_by_key: dict[str, list[dict]] = {k: [] for k in keys}
    if keys:
        dataset = job.dataset()
        columns = COLUMNS + [c for c in ("frame_index",) if c in dataset.schema.names]  # older outputs have no frames
        table = dataset.to_table(columns=columns, filter=ds.field("image_key").isin(keys))
        for row in table.to_pylist():
            rows_by_key[row["image_key"]].append(row)
    for rows in rows_by_key.values():
        rows.sort(key=lambda r: r["instance_index"] if r["instance_index"] is not None else -1)
    return rows_by_key


def safe_name(key: str, max_len: int = 80) -> str:
    """A file name for an image key: `[A-Za-z0-9._-]` only, no leading dot, no extension, bounded."""
    stem = posixpath.splitext(key)[0] if "." in posixpath.basename(key) else key
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__"))
    stem = re.sub(r"\.{2,}", "_", stem).strip("._-")
    return (stem[:max_len].rstrip("._-") or "image") + "-" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]


def unique_names(keys: list[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    used: set[str] = set()
    for key in keys:
        name, n = safe_name(key), 1
        while name.lower() in used:  # case-insensitive file systems
            n += 1
            name = f"{safe_name(key)}-{n}"
        used.add(name.lower())
        names[key] = name
    return names


def instance_colours(n: int) -> list[tuple[int, int, int]]:
    """n well-separated saturated colours, one per instance (golden-ratio hue steps, so neighbours differ)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.9, 1.0)) for i in range(n)]


def side_colour(colour: tuple[int, int, int], side: str) -> tuple[int, int, int]:
    """The instance's colour for a limb or keypoint: lighter on the left side, darker on the right."""
    if side == "left":
        return tuple(int(c + (255 - c) * 0.55) for c in colour)
    if side == "right":
        return tuple(int(c * 0.5) for c in colour)
    return colour


def keypoint_sides(names: list[str]) -> list[str]:
    """left, right or centre for each keypoint, from its name."""
    return ["left" if re.search(r"(^|_)(left|l)(_|$)", n.lower()) else
            "right" if re.search(r"(^|_)(right|r)(_|$)", n.lower()) else "centre" for n in names]


def draw_instances(image: Image.Image, rows: list[dict], schemas: dict[str, dict], threshold: float,
                   colours: list[tuple[int, int, int]]) -> int:
    """Draw boxes, labels, limbs and keypoints of `rows` on `image` in place, instance i in colours[i];
    return the keypoints drawn."""
    draw = ImageDraw.Draw(image)
    long_side = max(image.size)
    scale = max(1.0, long_side / THUMB_SIZE)  # image pixels per thumbnail pixel
    line = max(2, round(1.5 * scale))
    radius = line + 1
    font = _font(max(12, round(LABEL_PIXELS_IN_THUMB * scale)))
    drawn = 0
    for row, colour in zip(rows, colours):
        schema = schemas.get(row["keypoint_schema"]) or {}
        sides = keypoint_sides(schema.get("keypoints") or [])
        x, y, s = row["keypoint_x"] or [], row["keypoint_y"] or [], row["keypoint_score"] or []
        ok = [i < len(s) and s[i] is not None and s[i] > threshold and _finite(x[i], y[i]) for i in range(len(x))]
        bx, by, bw, bh = row["bbox"]
        draw.rectangle([bx, by, bx + bw, by + bh], outline=(0, 0, 0), width=line + 2)
        draw.rectangle([bx, by, bx + bw, by + bh], outline=colour, width=line)
        for a, b in schema.get("skeleton") or []:
            if a < len(ok) and b < len(ok) and ok[a] and ok[b]:
                side = sides[a] if a < len(sides) and sides[a] == (sides[b] if b < len(sides) else None) else "centre"
                draw.line([(x[a], y[a]), (x[b], y[b])], fill=(0, 0, 0), width=line + 2)
                draw.line([(x[a], y[a]), (x[b], y[b])], fill=side_colour(colour, side), width=line)
        for i, visible in enumerate(ok):
            if visible:
                fill = side_colour(colour, sides[i] if i < len(sides) else "centre")
                draw.ellipse([x[i] - radius, y[i] - radius, x[i] + radius, y[i] + radius], fill=fill, outline=(0, 0, 0))
                drawn += 1
        _label(draw, row, colour, font, (bx, by, bw, bh), image.size)
    return drawn


def _label(draw: ImageDraw.ImageDraw, row: dict, colour, font, box, size) -> None:
    """`#index score` on a patch of the instance's colour just above its box (inside it at the image's top)."""
    score = row["instance_score"]
    text = f"#{row['instance_index']} {score:.2f}" if score is not None else f"#{row['instance_index']}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 6, bottom - top + 6
    bx, by = box[0], box[1]
    x = min(max(0, bx), max(0, size[0] - width))
    y = by - height if by - height >= 0 else by
    draw.rectangle([x, y, x + width, y + height], fill=colour, outline=(0, 0, 0))
    draw.text((x + 3 - left, y + 3 - top), text, fill=(0, 0, 0), font=font)


def _render_one(job: JobOutput, key: str, rows: list[dict], name: str, images_root: str | None, threshold: float,
                storage_options: dict, out_fs, out_root: str) -> Rendered:
    uri = rows[0]["image_uri"] if rows else None
    if images_root:
        uri = images_root.rstrip("/") + "/" + key
    scores = [r["instance_score"] for r in rows if r["instance_score"] is not None]
    kp = [v for r in rows for v in (r["keypoint_score"] or []) if v is not None]
    result = Rendered(
        image_key=key, file=None, thumb=None, instances=len(rows),
        mean_instance_score=sum(scores) / len(scores) if scores else None,
        mean_keypoint_score=sum(kp) / len(kp) if kp else None,
        keypoints_drawn=0, source=uri or "", lowest_score=min(scores) if scores else None, rows=rows,
        colours=instance_colours(len(rows)),
    )
    if not uri:
        result.problem = "no image_uri in the table; give --images"
        return result
    try:
        if rows and rows[0].get("frame_index") is not None and not images_root:  # a video's frame
            from raypose.output.render_video import FrameSource

            image = FrameSource(storage_options).frame(uri, rows[0]["frame_index"])
        else:
            image = decode_image(read_bytes(uri, storage_options), MAX_PIXELS)
    except ImageError as exc:
        result.problem = f"{exc.stage}: {exc}"
        return result
    result.size = image.size
    expected = (rows[0]["image_width"], rows[0]["image_height"]) if rows else None
    if expected and None not in expected and tuple(expected) != image.size:
        result.problem = (f"image is {image.size[0]}x{image.size[1]} but the job saw "
                          f"{expected[0]}x{expected[1]}; keypoints may not line up")
    result.keypoints_drawn = draw_instances(image, rows, job.schemas, threshold, result.colours)
    result.file = f"images/{name}.jpg"
    result.thumb = f"thumbs/{name}.jpg"
    _save_jpeg(image, out_fs, posixpath.join(out_root, result.file))
    thumb = image.copy()
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    _save_jpeg(thumb, out_fs, posixpath.join(out_root, result.thumb))
    return result


def _save_jpeg(image: Image.Image, fs, path: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())


def _finite(*values: Any) -> bool:
    return all(v is not None and v == v and abs(v) != float("inf") for v in values)


_FONTS: dict[int, Any] = {}


def _font(size: int):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has one bitmap size
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]
