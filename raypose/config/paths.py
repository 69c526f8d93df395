"""Every path and checkpoint field of a job, found by one walker and resolved in one place.

Data fields (`images.path`, `boxes.path`, `output.path`) name files or fsspec URLs; checkpoint
fields (`pose.model`, `pose.experts.NAME.model`, `boxes.detector.model`) name a local directory
or a hub id. A job file's relative paths are relative to the file, so it runs from any working
directory; a `--set` value's are relative to the working directory, as a shell user expects.
Once resolved, every local path is absolute and normalised: `out`, `./out/` and `/abs/out`
are one output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

DATA_FIELDS = ("images.path", "boxes.path", "output.path")


def is_url(value: str) -> bool:
    """A URL (s3://, gs://, memory://, file://), not a path on this machine."""
    return "://" in value


def is_absolute(value: str) -> bool:
    return value.startswith("~") or Path(value).is_absolute()


def path_fields(raw: dict[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(field, value, is_checkpoint) for every path or checkpoint field of a raw spec that holds a string."""
    for field in DATA_FIELDS:
        value = _get(raw, field)
        if isinstance(value, str) and value:
            yield field, value, False
    pose = raw.get("pose") if isinstance(raw.get("pose"), dict) else {}
    experts = pose.get("experts") if isinstance(pose.get("experts"), dict) else {}
    checkpoints = ["pose.model", *(f"pose.experts.{name}.model" for name in experts), "boxes.detector.model"]
    for field in checkpoints:
        value = _get(raw, field)
        if isinstance(value, str) and value:
            yield field, value, True


def resolve_paths(raw: dict[str, Any], base: Path, fields: set[str] | None = None) -> None:
    """Make the local paths of a raw spec absolute against `base`, in place (only `fields`, when given).

    A checkpoint field is a path only when it is absolute or names a directory that exists:
    a hub id (`owner/name`) looks like a relative path.
    """
    for field, value, checkpoint in list(path_fields(raw)):
        if (fields is not None and field not in fields) or is_url(value):
            continue
        path = Path(os.path.expanduser(value))
        candidate = path if path.is_absolute() else base / path
        if not checkpoint or path.is_absolute() or candidate.is_dir():
            _set(raw, field, os.path.normpath(candidate))


def local_paths(raw: dict[str, Any], base: Path) -> list[tuple[str, str, bool]]:
    """(field, value, is_relative) for every field of a raw (unresolved) spec that names this machine's files."""
    found = []
    for field, value, checkpoint in path_fields(raw):
        if is_url(value):
            continue
        if not checkpoint or is_absolute(value):
            found.append((field, value, not is_absolute(value)))
        elif (base / value).is_dir() or Path(value).is_dir():
            found.append((field, value, True))
    return found


def _get(raw: dict[str, Any], field: str) -> Any:
    node: Any = raw
    for part in field.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _set(raw: dict[str, Any], field: str, value: str) -> None:
    *parents, last = field.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value
