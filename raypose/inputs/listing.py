"""Listing: the images under a directory, glob or manifest (or inside tar/Parquet containers), with stable keys."""

from __future__ import annotations

import posixpath

import pyarrow as pa

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.errors import SpecError
from raypose.inputs.storage import open_url, uri_of

MANIFEST_SUFFIXES = (".txt", ".lst")
GLOB_CHARS = "*?["


def list_images(images: ImagesSpec, boxes: BoxesSpec | None = None) -> pa.Table:
    """List (image_key, image_uri) under a directory, glob or manifest, sorted by key.

    Keys are stable across runs: the path relative to the directory (or to the glob's
    fixed prefix, or to the manifest's folder); for WebDataset tars and Parquet files, the
    image's name inside them (see `containers`), with where its bytes are, and its inline
    boxes when `boxes.source` is `inline`.
    """
    if images.format != "files":
        from raypose.inputs.containers import CONTAINER_SUFFIXES, list_container_images

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
    fs, root = open_url(images.path, images.storage_options, "images.path")
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
    return [(k, uri_of(fs, p)) for k, p in pairs]


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


def _hidden(key: str) -> bool:
    # ".." is a manifest entry's way up from the manifest's folder, not a dotfile.
    return any(part.startswith(".") and part not in (".", "..") for part in key.split("/"))
