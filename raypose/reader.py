"""The reader: list images under a path or URL, read their bytes, decode them to RGB."""

from __future__ import annotations

import contextlib
import io
import posixpath
import warnings
from typing import Any, Callable

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.core import url_to_fs
from PIL import Image, ImageOps, UnidentifiedImageError

from raypose.errors import SpecError
from raypose.spec import BoxesSpec, ImagesSpec
from raypose.storage import with_retries

MANIFEST_SUFFIXES = (".txt", ".lst")
_ORIENTATION = 0x0112  # EXIF Orientation tag
GLOB_CHARS = "*?["


class ImageError(Exception):
    """An image that cannot be used; its message becomes the errors-table reason."""

    def __init__(self, reason: str, stage: str = "decode"):
        super().__init__(reason)
        self.stage = stage


def list_images(images: ImagesSpec, boxes: BoxesSpec | None = None) -> pa.Table:
    """List (image_key, image_uri) under a directory, glob or manifest, sorted by key.

    Keys are stable across runs: the path relative to the directory (or to the glob's
    fixed prefix, or to the manifest's folder); for WebDataset tars and Parquet files, the
    image's name inside them (see `containers`), with where its bytes are, and its inline
    boxes when `boxes.source` is `inline`.
    """
    if images.format != "files":
        from raypose.containers import CONTAINER_SUFFIXES, list_container_images

        files = _list_files(images, CONTAINER_SUFFIXES[images.format], f"{images.format} files")
        table = list_container_images(images, boxes, [uri for _, uri in files])
        if not table.num_rows:
            raise SpecError(f"images.path: no images inside the {images.format} files under {images.path}")
        keys = table.column("image_key").to_pylist()
        if len(set(keys)) != len(keys):
            duplicate = next(k for k in keys if keys.count(k) > 1)
            raise SpecError(f"images.path: image key {duplicate!r} appears more than once in the {images.format} files")
        return table.sort_by("image_key")
    pairs = _list_files(images, tuple(s.lower() for s in images.extensions), "images")
    return pa.table({"image_key": [k for k, _ in pairs], "image_uri": [uri for _, uri in pairs]})


def _list_files(images: ImagesSpec, suffixes: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    """(key, uri) of the files under a directory, glob or manifest that end with a suffix."""
    fs, root = _filesystem(images.path, images.storage_options, "images.path")
    if root.lower().endswith(MANIFEST_SUFFIXES):
        pairs = _list_manifest(fs, root)
    elif any(c in images.path for c in GLOB_CHARS):
        prefix = root[: min(root.find(c) for c in GLOB_CHARS if c in root)].rsplit("/", 1)[0]
        pairs = [(posixpath.relpath(p, prefix), p) for p in _call(fs.glob, root, url=images.path)]
    else:
        if not _call(fs.isdir, root, url=images.path):
            raise SpecError(f"images.path: {images.path} is not a directory, glob or manifest (.txt) that exists")
        pairs = [(posixpath.relpath(p, root), p) for p in _call(fs.find, root, url=images.path)]
    # One task per key: a manifest that lists an image twice must not label it twice.
    pairs = sorted(dict((k, p) for k, p in pairs if k.lower().endswith(suffixes) and not _hidden(k)).items())
    if not pairs:
        raise SpecError(f"images.path: no {what} under {images.path} (looked for {', '.join(suffixes)})")
    return [(k, _uri(fs, p)) for k, p in pairs]


def read_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    """Read one object's bytes; missing or unreadable objects raise ImageError."""
    try:
        with fsspec.open(uri, "rb", **with_retries(uri, storage_options)) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ImageError("not found in storage", stage="read") from exc
    except Exception as exc:  # any storage failure (network, permissions) is this image's error
        raise ImageError(f"cannot read: {type(exc).__name__}: {exc}", stage="read") from exc


def read_task_bytes(task: dict, storage_options: dict[str, Any], image_column: str, containers: dict) -> bytes:
    """An image task's bytes: already read by the detector, inside a container, or a file of its own.

    `containers` caches the Parquet file being read across calls (one batch's images).
    """
    if task.get("image_bytes"):
        return task["image_bytes"]
    if task.get("container"):
        from raypose.containers import read_container_bytes

        try:
            return read_container_bytes(task, with_retries(task["container"], storage_options), image_column, containers)
        except Exception as exc:  # a broken container costs its images, not the batch
            raise ImageError(f"cannot read from {task['container']}: {type(exc).__name__}: {exc}", stage="read") from exc
    return read_bytes(task["image_uri"], storage_options)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes to an RGB image, EXIF orientation applied.

    Animated images give their first frame; 16-bit images are scaled to 8 bits;
    transparent pixels are composited on white, as transformers' `convert_to_rgb` does.
    """
    return decode_image_reduced(data, max_pixels)[0]


def decode_image_reduced(
    data: bytes, max_pixels: int, reduction: Callable[[tuple[int, int]], int] | None = None
) -> tuple[Image.Image, int, tuple[int, int]]:
    """`decode_image`, optionally decoding a JPEG at 1/2, 1/4 or 1/8 of its size (Pillow's draft mode).

    `reduction(size)` gets the full (width, height) and returns the wanted factor (1, 2, 4
    or 8); libjpeg then decodes straight to the smaller size (a DCT-domain downscale, so
    each pixel is roughly the mean of a factor x factor block) and skips the full-size
    image. Only JPEGs without an EXIF rotation are reduced. Returns the RGB image, the
    factor it was reduced by (1 when not), and the full size (after EXIF orientation).
    """
    with _image_errors():
        image = _open_image(data, max_pixels)
        width, height = image.size
        factor = 1
        if reduction is not None and image.format == "JPEG" and image.getexif().get(_ORIENTATION, 1) == 1:
            wanted = int(reduction((width, height)))
            if wanted > 1:
                drafted = image.draft("RGB", (max(1, width // wanted), max(1, height // wanted)))
                if drafted is not None:
                    factor = max(1, round(width / drafted[1][2]))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        full_size = image.size if factor == 1 else (width, height)
        return _to_rgb(image), factor, full_size


def probe_image(data: bytes | pa.Buffer, max_pixels: int) -> tuple[tuple[int, int], bool]:
    """An image's (width, height) after EXIF orientation, from its header alone, and whether it
    is a plain JPEG (RGB or grey, no EXIF rotation) that a GPU JPEG decoder can take as it is.

    Fails as `decode_image` does on what the header already shows; the pixels are not read.
    """
    with _image_errors():
        image = _open_image(data, max_pixels)
        orientation = image.getexif().get(_ORIENTATION, 1)
        width, height = image.size
        plain_jpeg = image.format == "JPEG" and orientation == 1 and image.mode in ("RGB", "L")
        return ((height, width) if orientation in (5, 6, 7, 8) else (width, height)), plain_jpeg


def _open_image(data: bytes | pa.Buffer, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes)")
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} = {width * height / 1e6:.3g} Mpx is above images.max_pixels "
            f"({max_pixels:,} pixels): refused as a possible decompression bomb"
        )
    return image


@contextlib.contextmanager
def _image_errors():
    """Any failure to open or decode an image -> ImageError with a reason for the errors table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(f"refused as a decompression bomb: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageError("not an image Pillow can decode (unknown format)") from exc
        except Exception as exc:  # hostile bytes can trip any decoder error; none may stop the job
            raise ImageError(f"corrupt or truncated image data: {type(exc).__name__}: {exc}") from exc


def read_images(batch: pa.Table, *, storage_options: dict[str, Any], image_column: str = "image") -> pa.Table:
    """Image tasks -> the same rows with `image_bytes` read; a failed read becomes the row's error.

    The CPU stage when the pose device decodes and crops (resources.crop_in: pose_device).
    """
    tasks = batch.to_pylist()
    containers: dict = {}
    for task in tasks:
        data = read_cropped_image(task, storage_options, image_column, containers)
        if isinstance(data, ImageError):
            task["error_stage"], task["error_reason"] = data.stage, str(data)
        elif data is not None:
            task["image_bytes"] = data
    return pa.Table.from_pylist(tasks, schema=batch.schema)


def read_cropped_image(task: dict, storage_options: dict[str, Any], image_column: str,
                       containers: dict) -> bytes | pa.Buffer | ImageError | None:
    """The bytes of an image the crop step will cut, the ImageError reading them raised, or None
    when there is nothing to cut (an earlier stage's failure, no boxes): the crop step records it as it is."""
    if task.get("error_stage") or not task["box_xywh"]:
        return None
    try:
        return read_task_bytes(task, storage_options, image_column, containers)
    except ImageError as exc:
        return exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's own convert("RGB") clips wide values at 255 instead of scaling them.
        wide = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            wide = wide / 257.0
        return Image.fromarray(np.clip(wide + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    # As transformers' convert_to_rgb: an alpha band, or a tRNS colour key (P, but also L and RGB PNGs).
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")  # an RGB image needs no copy


def _filesystem(url: str, storage_options: dict[str, Any], field: str):
    try:
        return url_to_fs(url, **with_retries(url, storage_options))
    except (ImportError, ValueError, TypeError) as exc:
        raise SpecError(f"{field}: cannot open {url}: {exc}") from exc


def _call(fn, *args, url: str):
    try:
        return fn(*args)
    except FileNotFoundError as exc:
        raise SpecError(f"images.path: {url} does not exist") from exc
    except PermissionError as exc:
        raise SpecError(f"images.path: permission denied listing {url}: {exc}") from exc
    except OSError as exc:
        raise SpecError(f"images.path: cannot list {url}: {exc}") from exc


def _list_manifest(fs, manifest: str) -> list[tuple[str, str]]:
    try:
        lines = fs.cat_file(manifest).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"images.path: cannot read manifest {manifest}: {exc}") from exc
    base = posixpath.dirname(manifest)
    pairs = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" in entry:
            pairs.append((entry.split("://", 1)[1], entry))
        elif entry.startswith("/"):
            pairs.append((entry.lstrip("/"), entry))
        else:
            # Object stores take "a/../b" literally, so "../images/x.jpg" must be resolved here.
            pairs.append((posixpath.normpath(entry), posixpath.normpath(posixpath.join(base, entry))))
    return pairs


def _uri(fs, path: str) -> str:
    if "://" in path:
        return path
    return fs.unstrip_protocol(path)


def _hidden(key: str) -> bool:
    # ".." is a manifest entry's way up from the manifest's folder, not a dotfile.
    return any(part.startswith(".") and part not in (".", "..") for part in key.split("/"))
