"""A job file's YAML, refused when it is larger than a job can be, before anything walks it.

YAML aliases let a 1 kB file stand for a billion values (nine levels of nine aliases of nine):
safe_load builds it cheaply, the aliases sharing one object, but anything that walks the
result (validation, an error message, a hash, fsspec tokenizing storage options) walks every
copy. So its size is counted first from the parser's events, each alias (merge keys `<<` too)
as the size of what it names, and the file is refused before anything is built when that passes
MAX_VALUES, or when it nests deeper than MAX_DEPTH. A job needs a few hundred values; the limit
leaves room for long category lists and routing tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raypose.errors import SpecError

MAX_BYTES = 256 << 10  # of a job file, or of one --set value
MAX_VALUES = 10_000  # scalars, lists and mappings once every alias is expanded
MAX_DEPTH = 64  # lists and mappings inside each other


def read_job_text(path: Path) -> str:
    """A job file's text, read no further than MAX_BYTES (OSError, UnicodeDecodeError as reading raises them)."""
    with path.open("rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise SpecError(f"{path}: larger than {MAX_BYTES:,} bytes; a job file is a few hundred")
    return data.decode("utf-8")


def load_bounded_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load(text)`, refused with one line naming `source` when it is larger than a job can be."""
    if len(text) > MAX_BYTES:
        raise SpecError(f"{source}: {len(text):,} characters; a job is at most {MAX_BYTES:,}")
    if expanded_size(text, source) > MAX_VALUES:
        raise SpecError(f"{source}: more than {MAX_VALUES:,} values once its YAML aliases are expanded "
                        "(a job needs a few hundred)")
    return yaml.safe_load(text)


def expanded_size(text: str, source: str) -> int:
    """How many values (scalars, lists, mappings) the YAML stands for with every alias expanded, counted
    from its parse events, in one pass that stops once the count passes MAX_VALUES: the bomb costs its own size.
    An alias of a collection it is inside counts as past the limit (it is endless once expanded)."""
    count = 0
    open_collections: list[tuple[str | None, int]] = []  # (anchor, count before it), innermost last
    sizes: dict[str, int] = {}  # anchor -> the size of what it names
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            inside = any(anchor == event.anchor for anchor, _ in open_collections)
            count += MAX_VALUES + 1 if inside else sizes.get(event.anchor, 1)  # an unknown one: safe_load says so
        elif isinstance(event, yaml.ScalarEvent):
            count += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_collections.append((event.anchor, count))
            count += 1
            if len(open_collections) > MAX_DEPTH:
                raise SpecError(f"{source}: nested deeper than {MAX_DEPTH} levels; a job is a few levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_collections.pop()
            if anchor:
                sizes[anchor] = count - before
        if count > MAX_VALUES:
            break
    return count
