"""Names as storage holds them and as raypose's tables hold them: the same, but for bytes that are not UTF-8.

A local file system (and a tar header) may hold any bytes in a name; Python hands such a
name over with each undecodable byte as a lone surrogate (`os.fsdecode`'s surrogate
escapes), which no Arrow or Parquet string column can store. raypose writes each such byte
as `%XX` (upper-case hex, 80 to FF): a Latin-1 `caf\\xe9.jpg` is keyed `caf%E9.jpg`, and its
image_uri is `file:///.../caf%E9.jpg`. Names that are UTF-8, nearly all of them, are
untouched, so keys of ordinary names never change. Reading goes back the other way (`on_disk`)
only for a local path that does not exist as written: a path that exists is a path.
"""

from __future__ import annotations

import os
import re

import pyarrow as pa

SURROGATE = re.compile("[\ud800-\udfff]")
ESCAPE = re.compile(rb"%([89A-F][0-9A-F])")


def escaped(name: str) -> str:
    """`name` with each byte that is not UTF-8 (a surrogate escape) as `%XX`; UTF-8 names as they are."""
    if name.isascii() or not SURROGATE.search(name):
        return name
    return SURROGATE.sub(_percent, name)


def _percent(match: re.Match) -> str:
    # A surrogate escape stands for one byte; any other lone surrogate (from a JSON "\ud800") for its 3 bytes.
    raw = match.group().encode("utf-8", "surrogateescape" if "\udc80" <= match.group() <= "\udcff" else "surrogatepass")
    return "".join(f"%{b:02X}" for b in raw)


def name_array(names: list[str]) -> pa.Array:
    """Names from storage as an Arrow string column, escaped where they are not UTF-8 (in Python only then)."""
    try:
        return pa.array(names, pa.string())
    except UnicodeEncodeError:
        return pa.array([escaped(n) for n in names], pa.string())


def on_disk(path: str) -> str:
    """A local path as the file system holds it: `path` if it exists, else with its `%XX` escapes as bytes."""
    if "%" not in path or os.path.lexists(path):
        return path
    unescaped = os.fsdecode(ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), os.fsencode(path)))
    return unescaped if os.path.lexists(unescaped) else path
