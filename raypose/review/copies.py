"""Copies of a job's images for a labeling tool to serve: read from their `image_uri` (files, tar members, Parquet
rows), written under `<out>/images/` with sanitized, unique names."""

from __future__ import annotations

import posixpath
import re
from typing import Any

from raypose.errors import ImageError
from raypose.inputs.fetch import read_image
from raypose.review.reading import JobOutput, open_fs
from raypose.review.render import unique_names


def copy_images(job: JobOutput, uris: dict[str, str], out: str,
                storage_options: dict[str, Any] | None) -> tuple[dict[str, str], list[str]]:
    """Copy each image (key -> image_uri) to `out`/images/; return key -> file name, and the images that failed."""
    fs, root = open_fs(out, storage_options, "--out")
    names = unique_names(list(uris))
    copied, problems = {}, []
    fs.makedirs(posixpath.join(root, "images"), exist_ok=True)
    containers: dict = {}  # a tar's member index, a Parquet file's image column: read once for all its images
    for key, uri in uris.items():
        try:
            data = read_image(uri, storage_options or {}, job.image_column, containers)
        except ImageError as exc:
            problems.append(f"{key}: {exc}")
            continue
        copied[key] = names[key] + extension(key)
        with fs.open(posixpath.join(root, "images", copied[key]), "wb") as f:
            f.write(data)
    return copied, problems


def extension(key: str) -> str:
    """The key's own file extension when it is a plain one, else .jpg."""
    ext = posixpath.splitext(key)[1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".jpg"
