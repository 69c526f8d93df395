"""`raypose render`: skeletons drawn on a sample of a job's images, and an index.html to eyeball them.

For each sampled image: the box outline, the schema's skeleton (one colour per limb, a limb
drawn when both its keypoints score above `min_score`) and the keypoints above `min_score`,
drawn with PIL.ImageDraw on the decoded image (EXIF orientation applied, as the job saw it),
saved as `images/<safe name>.jpg` with a thumbnail in `thumbs/`. `index.html` is a grid of
the thumbnails with per-image stats (instances, mean instance score, mean keypoint score,
keypoints drawn), each linking to the full-size picture.

Images are read from the table's `image_uri`, or from `--images ROOT` + image_key when the
images have moved (or are mounted elsewhere). File names are derived from image keys but
sanitized: only `[A-Za-z0-9._-]`, no leading dots, bounded length, plus a hash of the key
so two keys never collide; nothing is ever written outside `--out`.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
import io
import posixpath
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.dataset as ds
from PIL import Image, ImageDraw, ImageFont

from raypose.errors import ImageError
from raypose.imaging.decode import decode_image
from raypose.inputs.fetch import read_bytes
from raypose.output.reading import JobOutput, OutputError, open_fs

COLUMNS = [
    "image_key", "image_uri", "image_width", "image_height", "instance_index", "bbox", "keypoint_schema",
    "keypoint_x", "keypoint_y", "keypoint_score", "instance_score",
]  # fmt: skip
THUMB_SIZE = 320
MAX_PIXELS = 100_000_000
JPEG_QUALITY = 90
BOX_COLOUR = (255, 255, 255)


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


def render_output(
    output: str,
    out: str,
    *,
    images: str | None = None,
    sample: int = 50,
    min_score: float = 0.3,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    workers: int = 4,
) -> list[Rendered]:
    """Draw a sample of a job's images into `out` (local path or URL); return what was rendered."""
    if sample < 1:
        raise OutputError(f"--sample: expected a positive number of images, got {sample}")
    job = JobOutput.open(output, storage_options)
    dataset = job.dataset()
    keys = sorted(set(dataset.to_table(columns=["image_key"]).column("image_key").to_pylist())) if dataset else []
    chosen = sorted(random.Random(seed).sample(keys, min(sample, len(keys))))
    rows_by_key: dict[str, list[dict]] = {k: [] for k in chosen}
    if chosen:
        table = dataset.to_table(columns=COLUMNS, filter=ds.field("image_key").isin(chosen))
        for row in table.to_pylist():
            rows_by_key[row["image_key"]].append(row)
    for rows in rows_by_key.values():
        rows.sort(key=lambda r: r["instance_index"] if r["instance_index"] is not None else -1)

    out_fs, out_root = open_fs(out, storage_options, "--out")
    try:
        for folder in ("images", "thumbs"):
            out_fs.makedirs(posixpath.join(out_root, folder), exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out: cannot create {out}: {type(exc).__name__}: {exc}") from exc
    names = unique_names(chosen)

    def work(key: str) -> Rendered:
        return _render_one(job, key, rows_by_key[key], names[key], images, min_score,
                           storage_options or {}, out_fs, out_root)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rendered = list(pool.map(work, chosen))
    page = index_html(rendered, job, min_score=min_score, seed=seed, sample=sample, total_images=len(keys))
    with out_fs.open(posixpath.join(out_root, "index.html"), "wb") as f:
        f.write(page.encode("utf-8"))
    return rendered


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


def limb_colours(n: int) -> list[tuple[int, int, int]]:
    """n well-separated, saturated colours (one per limb)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.85, 1.0)) for i in range(n)]


def draw_instances(image: Image.Image, rows: list[dict], schemas: dict[str, dict], min_score: float) -> int:
    """Draw boxes, limbs and keypoints of `rows` on `image` in place; return keypoints drawn."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    line = max(2, round(min(width, height) / 160))
    radius = line + 1
    font = _font(max(10, line * 6))
    drawn = 0
    for row in rows:
        schema = schemas.get(row["keypoint_schema"]) or {}
        skeleton = schema.get("skeleton") or []
        colours = limb_colours(len(skeleton))
        x, y, s = row["keypoint_x"] or [], row["keypoint_y"] or [], row["keypoint_score"] or []
        ok = [i < len(s) and s[i] is not None and s[i] > min_score and _finite(x[i], y[i]) for i in range(len(x))]
        bx, by, bw, bh = row["bbox"]
        draw.rectangle([bx, by, bx + bw, by + bh], outline=(0, 0, 0), width=line + 2)
        draw.rectangle([bx, by, bx + bw, by + bh], outline=BOX_COLOUR, width=line)
        label = f"#{row['instance_index']} {row['instance_score']:.2f}" if row["instance_score"] is not None else ""
        if label:
            draw.text((bx + line + 1, by + line + 1), label, fill=BOX_COLOUR, font=font, stroke_width=1,
                      stroke_fill=(0, 0, 0))
        colour_of_point: dict[int, tuple[int, int, int]] = {}
        for (a, b), colour in zip(skeleton, colours):
            colour_of_point.setdefault(a, colour)
            colour_of_point.setdefault(b, colour)
            if a < len(ok) and b < len(ok) and ok[a] and ok[b]:
                draw.line([(x[a], y[a]), (x[b], y[b])], fill=colour, width=line)
        for i, visible in enumerate(ok):
            if not visible:
                continue
            colour = colour_of_point.get(i, (255, 255, 255))
            draw.ellipse([x[i] - radius, y[i] - radius, x[i] + radius, y[i] + radius], fill=colour, outline=(0, 0, 0))
            drawn += 1
    return drawn


def _render_one(job: JobOutput, key: str, rows: list[dict], name: str, images_root: str | None, min_score: float,
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
        keypoints_drawn=0, source=uri or "",
    )
    if not uri:
        result.problem = "no image_uri in the table; give --images"
        return result
    try:
        image = decode_image(read_bytes(uri, storage_options), MAX_PIXELS)
    except ImageError as exc:
        result.problem = f"{exc.stage}: {exc}"
        return result
    result.size = image.size
    expected = (rows[0]["image_width"], rows[0]["image_height"]) if rows else None
    if expected and None not in expected and tuple(expected) != image.size:
        result.problem = (f"image is {image.size[0]}x{image.size[1]} but the job saw "
                          f"{expected[0]}x{expected[1]}; keypoints may not line up")
    result.keypoints_drawn = draw_instances(image, rows, job.schemas, min_score)
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


def index_html(rendered: list[Rendered], job: JobOutput, *, min_score: float, seed: int, sample: int,
               total_images: int) -> str:
    """A self-contained page: the job in one line, then a grid of thumbnails with stats."""
    e = html.escape
    manifest = job.manifest or {}
    models = "; ".join(f"{name}: {e.get('model', '?')} @ {e.get('revision', '?')}" for name, e in job.experts.items())
    cells = []
    for r in rendered:
        stats = [
            f"{r.instances} instance{'s' if r.instances != 1 else ''}",
            f"mean score {_fmt(r.mean_instance_score)}",
            f"keypoint score {_fmt(r.mean_keypoint_score)}",
            f"{r.keypoints_drawn} keypoints drawn",
        ]
        if r.size:
            stats.append(f"{r.size[0]}x{r.size[1]}")
        picture = (f'<a href="{e(r.file)}"><img src="{e(r.thumb)}" alt="{e(r.image_key)}" loading="lazy"></a>'
                   if r.file else '<div class="missing">not rendered</div>')
        problem = f'<div class="problem">{e(r.problem)}</div>' if r.problem else ""
        cells.append(
            f'<figure>{picture}<figcaption><b title="{e(r.source)}">{e(r.image_key)}</b><br>'
            f'{e(" · ".join(stats))}{problem}</figcaption></figure>'
        )
    title = f"raypose QA: {manifest.get('job_id') or job.url}"
    header = (
        f"{len(rendered)} of {total_images} images (seed {seed}, sample {sample}); "
        f"keypoints and limbs drawn above score {min_score:g}; "
        f"models {models or '?'}; output {job.url}"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font: 13px/1.35 system-ui, sans-serif; margin: 1em; background: #fafafa; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax({THUMB_SIZE + 10}px, 1fr)); gap: 10px; }}
figure {{ margin: 0; padding: 5px; background: #fff; border: 1px solid #ddd; }}
figure img {{ max-width: 100%; display: block; margin: auto; }}
figcaption {{ margin-top: 4px; word-break: break-all; }}
.problem {{ color: #b00; }}
.missing {{ height: 120px; display: flex; align-items: center; justify-content: center; color: #b00; }}
</style></head>
<body>
<h1>{e(title)}</h1>
<p>{e(header)}</p>
<div class="grid">
{chr(10).join(cells)}
</div>
</body></html>
"""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


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
