"""`raypose render`: a job's images with their boxes and skeletons drawn, chosen for review, and a QA page.

Images are chosen from the keypoints table (`selection.py`: filtered by expert, category and a
score range) and ordered worst first by their lowest instance score, or by flip_oks or
instance_doubt (`--by`), or best first, by name, or at random;
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

import hashlib
import io
import posixpath
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from raypose.errors import ImageError
from raypose.imaging.decode import decode_image
from raypose.inputs.fetch import read_image
from raypose.review.drawing import THUMB_SIZE, draw_instances, instance_colours
from raypose.review.frames import FrameSource
from raypose.review.qa_page import Rendered, write_pages
from raypose.review.reading import JobOutput, OutputError, open_fs
from raypose.review.selection import Selection, choose_images, rows_of

COLUMNS = [
    "image_key", "image_uri", "image_width", "image_height", "instance_index", "bbox", "keypoint_schema",
    "keypoint_x", "keypoint_y", "keypoint_score", "instance_score", "category", "expert",
]  # fmt: skip
MAX_PIXELS = 100_000_000
JPEG_QUALITY = 90


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
    selection.check()
    job = JobOutput.open(output, storage_options)
    chosen, matching = choose_images(job, selection)
    rows_by_key = rows_of(job, chosen, COLUMNS + ["frame_index"])
    out_fs, out_root = open_fs(out, storage_options, "--out")
    try:
        for folder in ("images", "thumbs", "view"):
            out_fs.makedirs(posixpath.join(out_root, folder), exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out: cannot create {out}: {type(exc).__name__}: {exc}") from exc
    names = unique_names(chosen)
    frame_source = FrameSource(storage_options or {})  # one for the whole render: each video indexed once
    per_thread = threading.local()  # each drawing thread's container cache (a tar's index, a Parquet column)

    def work(key: str) -> Rendered:
        if not hasattr(per_thread, "containers"):
            per_thread.containers = {}
        return _render_one(job, key, rows_by_key[key], names[key], images, keypoint_threshold,
                           storage_options or {}, frame_source, per_thread.containers, out_fs, out_root)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rendered = list(pool.map(work, chosen))
    write_pages(rendered, job, out_fs, out_root, names, selection=selection, matching=matching,
                keypoint_threshold=keypoint_threshold)
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


def _render_one(job: JobOutput, key: str, rows: list[dict], name: str, images_root: str | None, threshold: float,
                storage_options: dict, frame_source: FrameSource, containers: dict, out_fs,
                out_root: str) -> Rendered:
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
            image = frame_source.frame(uri, rows[0]["frame_index"])
        else:
            image = decode_image(read_image(uri, storage_options or {}, job.image_column, containers), MAX_PIXELS)
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


