"""Listing: the images under a directory, glob or manifest (or inside tar/Parquet containers), with stable keys.

Any name storage holds is listed: bytes that are not UTF-8 are `%XX` in keys and URIs (`names`),
a path that exists is taken as a path even with glob characters in it, and names that cannot be
images (a null Parquet key, a tar's links and duplicates) are error rows, not silent gaps.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.errors import SpecError
from raypose.inputs.arrays import NotSorted, ascending, filtered
from raypose.inputs.inventory import LISTING_SCHEMA, is_inventory, iter_inventory, list_inventory
from raypose.inputs.key_order import sorted_by_key
from raypose.inputs.names import name_array
from raypose.inputs.storage import open_url, uri_of
from raypose.schema import ERRORS_SCHEMA

MANIFEST_SUFFIXES = (".txt", ".lst")
MANIFEST_BLOCK_BYTES = 1 << 22  # a streamed manifest is read this much at a time
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Listing:
    """What listing found: the images, sorted by key, and what it could not take as an image."""

    images: pa.Table  # image_key, image_uri [, container, offset, length [, inline boxes]]
    errors: pa.Table = field(default_factory=ERRORS_SCHEMA.empty_table)  # stage "list", one row a name
    counts: dict[str, int] = field(default_factory=dict)  # what was passed over, by kind (docs/names.md)


def list_images(images: ImagesSpec, boxes: BoxesSpec | None = None) -> Listing:
    """List (image_key, image_uri) under a directory, glob or manifest, sorted by key.

    Keys are stable across runs: the path relative to the directory (or to the glob's
    fixed prefix, or to the manifest's folder); for WebDataset tars and Parquet files, the
    image's name inside them (see `containers`), with where its bytes are, and its inline
    boxes when `boxes.source` is `inline`. Columnar throughout: no Python object per image.
    Video files (`images.format: video`) are listed as files are, then indexed: their sampled frames are
    the listing (`video.list_frames`).
    """
    if images.format == "video":
        from raypose.inputs.video import list_frames

        return Listing(list_frames(_list_files(images, tuple(s.lower() for s in images.video.extensions), "videos"),
                                   images))
    if images.format != "files":
        from raypose.inputs.containers import CONTAINER_SUFFIXES, list_container_images

        files = _list_files(images, CONTAINER_SUFFIXES[images.format], f"{images.format} files")
        table, errors, counts = list_container_images(images, boxes, files.column("image_uri").to_pylist())
        if not table.num_rows:
            raise SpecError(f"images.path: no images inside the {images.format} files under {images.path}")
        table = _with_container_facts(table, files)
        table = table.sort_by("image_key")
        keys = table.column("image_key")
        repeated = pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1)) if len(keys) > 1 else pa.array([], pa.bool_())
        if pc.any(repeated).as_py():
            duplicate = keys[pc.index(repeated, True).as_py()].as_py()
            raise SpecError(f"images.path: image key {duplicate!r} appears more than once in the {images.format} files")
        return Listing(table, _error_rows(errors), counts)
    return Listing(_list_files(images, tuple(s.lower() for s in images.extensions), "images"))


def _error_rows(rows: list[dict]) -> pa.Table:
    """Error-table rows (stage `list`) for names that are not images: dicts of image_key, image_uri, reason."""
    n = len(rows)
    return pa.table({
        "job_id": pa.nulls(n, pa.string()), "image_key": [r["image_key"] for r in rows],
        "image_uri": [r["image_uri"] for r in rows], "instance_index": pa.nulls(n, pa.int32()),
        "stage": ["list"] * n, "reason": [r["reason"] for r in rows],
    }, schema=ERRORS_SCHEMA)


def iter_images(images: ImagesSpec, boxes: BoxesSpec | None = None, chunk_rows: int = 1 << 16) -> ListedChunks:
    """The listing (as `list_images` gives it) in key order, at most `chunk_rows` images at a time.

    A manifest whose lines are sorted is read a block at a time and never held whole (the way a
    plan of 100M images stays small), and an S3 Inventory is sorted through runs spilled to local
    disk (`key_order.py`); any other listing is made whole, then handed out in chunks.
    """
    if images.format == "files":
        fs, root = open_url(images.path, images.storage_options, "images.path")
        if is_inventory(root):
            return ListedChunks(_inventory_chunks(images, chunk_rows))
        if root.lower().endswith(MANIFEST_SUFFIXES):
            streamed = _sorted_manifest_chunks(fs, root, images, chunk_rows)
            first = next(streamed, None)
            if first is not None:  # None: not sorted, or empty: listed whole below
                return ListedChunks(chain([first], streamed))  # a manifest's lines are all images' names
    listing = list_images(images, boxes)
    table = listing.images
    return ListedChunks((table.slice(start, chunk_rows) for start in range(0, table.num_rows, chunk_rows)),
                        listing.errors, listing.counts)


class ListedChunks:
    """`iter_images`' chunks of images (iterate it), with the error rows and counts of what the listing could
    not take as an image (`Listing`'s), known before the first chunk."""

    def __init__(self, chunks: Iterable[pa.Table], errors: pa.Table | None = None, counts: dict[str, int] | None = None):
        self.chunks = iter(chunks)
        self.errors = ERRORS_SCHEMA.empty_table() if errors is None else errors
        self.counts = counts or {}

    def __iter__(self) -> ListedChunks:
        return self

    def __next__(self) -> pa.Table:
        return next(self.chunks)


def _sorted_manifest_chunks(fs, manifest: str, images: ImagesSpec, chunk_rows: int) -> Iterator[pa.Table]:
    """A manifest's images by blocks of lines, while they come in key order; yields nothing if the first block
    is not sorted, and raises NotSorted if a later one is not."""
    from pyarrow import csv

    suffixes = tuple(s.lower() for s in images.extensions)
    carried = None  # the last image so far: the next block may list it again (the last listing of a key wins)
    listed = 0
    try:
        f = fs.open(manifest, "rb")
        reader = csv.open_csv(f, read_options=csv.ReadOptions(column_names=["line"], block_size=MANIFEST_BLOCK_BYTES),
                              parse_options=MANIFEST_PARSE, convert_options=MANIFEST_CONVERT)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SpecError(f"images.path: cannot read manifest {manifest}: {exc}") from exc
    with f:
        for batch in reader:
            keys, paths = _manifest_entries(fs, manifest, _text_lines(batch.column(0)))
            table = _wanted(pa.table({"image_key": keys, "image_uri": _uris(fs, paths),
                                      "image_size": pa.nulls(len(keys), pa.int64()),
                                      "image_version": pa.nulls(len(keys), pa.string())}), suffixes)
            if carried is not None:
                table = pa.concat_tables([carried, table]).combine_chunks()
            keys = table.column("image_key").combine_chunks() if table.num_rows else pa.array([], pa.string())
            if not ascending(keys):
                if listed == 0:
                    return
                raise NotSorted(manifest)
            table = _last_of_each_key(table)
            if not table.num_rows:
                continue
            carried = table.slice(table.num_rows - 1)
            for start in range(0, table.num_rows - 1, chunk_rows):
                chunk = table.slice(start, min(chunk_rows, table.num_rows - 1 - start))
                listed += chunk.num_rows
                yield chunk
    if carried is not None:
        yield carried
    elif listed == 0:
        raise SpecError(f"images.path: no images under {images.path} (looked for {', '.join(suffixes)})")


def _inventory_chunks(images: ImagesSpec, chunk_rows: int) -> Iterator[pa.Table]:
    """An S3 Inventory's images in key order, `chunk_rows` at a time, never held whole."""
    suffixes = tuple(s.lower() for s in images.extensions)
    wanted = (_wanted(table, suffixes) for table in iter_inventory(images))
    pending: list[pa.Table] = []
    listed = 0
    for step in sorted_by_key(wanted, LISTING_SCHEMA):
        pending.append(_last_of_each_key(step))  # a key's rows all come in one step
        if sum(t.num_rows for t in pending) >= chunk_rows:
            table = pa.concat_tables(pending).combine_chunks()
            whole = table.num_rows - table.num_rows % chunk_rows
            for start in range(0, whole, chunk_rows):
                listed += chunk_rows
                yield table.slice(start, chunk_rows)
            pending = [table.slice(whole)]
    rest = pa.concat_tables(pending) if pending else LISTING_SCHEMA.empty_table()
    if rest.num_rows:
        listed += rest.num_rows
        yield rest.combine_chunks()
    if not listed:
        raise _nothing_in_inventory(images, "images", suffixes)


def _nothing_in_inventory(images: ImagesSpec, what: str, suffixes: tuple[str, ...]) -> SpecError:
    return SpecError(f"images.path: no {what} in the inventory {images.path} under "
                     f"images.inventory_prefix {images.inventory_prefix!r} (looked for {', '.join(suffixes)})")


def _list_files(images: ImagesSpec, suffixes: tuple[str, ...], what: str) -> pa.Table:
    """(image_key, image_uri) of the files under a directory, glob or manifest that end with a suffix, by key."""
    fs, root = open_url(images.path, images.storage_options, "images.path")
    if is_inventory(root):
        table = _last_of_each_key(_wanted(list_inventory(images), suffixes))
        if not table.num_rows:
            raise _nothing_in_inventory(images, what, suffixes)
        return table
    if root.lower().endswith(MANIFEST_SUFFIXES):
        keys, paths = _list_manifest(fs, root)
        sizes, versions = pa.nulls(len(keys), pa.int64()), pa.nulls(len(keys), pa.string())
    else:
        # A path that exists is a path (a folder named "photos [2023]"); a glob only where none does.
        if _call(fs.isdir, root, url=images.path):
            base, found = root, _call(find_in_parallel, fs, root, url=images.path)
        elif any(c in images.path for c in GLOB_CHARS):
            base, found = _glob_base(root), _call(fs.glob, root, detail=True, url=images.path)
        else:
            raise SpecError(f"images.path: {images.path} is not a directory, glob or manifest (.txt) that exists")
        found = {path: info for path, info in found.items() if info.get("type") != "directory"}
        names = list(found)
        paths = name_array(names)
        keys = _relative_keys(paths, names, base)
        sizes, versions = object_facts(found.values())
    table = pa.table({"image_key": keys, "image_uri": _uris(fs, paths), "image_size": sizes,
                      "image_version": versions})
    table = _last_of_each_key(_wanted(table, suffixes))  # a manifest that lists an image twice must not label it twice
    if not table.num_rows:
        raise SpecError(f"images.path: no {what} under {images.path} (looked for {', '.join(suffixes)})")
    return table


def _glob_base(pattern: str) -> str:
    """The folder a glob's keys are relative to: its parts before the first with a wildcard, where a
    one-character class such as `[[]` or `[*]` is that character (how a glob names a literal `[`)."""
    parts = []
    for part in pattern.split("/"):
        literal = SINGLE_CHARACTER_CLASS.sub(r"\1", part)
        if any(c in SINGLE_CHARACTER_CLASS.sub("", part) for c in GLOB_CHARS):
            break
        parts.append(literal)
    return "/".join(parts[:-1] if len(parts) == len(pattern.split("/")) else parts)


SINGLE_CHARACTER_CLASS = re.compile(r"\[([^\]])\]")


def _relative_keys(paths: pa.Array, found: list[str], base: str) -> pa.Array:
    """Each found path relative to `base`, as `posixpath.relpath` gives it: a byte slice where that is the
    same (every path under `base/`, with no `.`, `..` or empty part to normalise), else relpath one by one."""
    prefix = base.rstrip("/") + "/"
    if prefix != "/" and pc.all(pc.starts_with(paths, prefix)).as_py() is not False:
        sliced = pc.binary_slice(paths.cast(pa.binary()), len(prefix.encode()), (1 << 31) - 1).cast(pa.string())
        if not pc.any(pc.match_substring_regex(sliced, NOT_NORMAL)).as_py():
            return sliced
    return name_array([posixpath.relpath(p, base) for p in found])


# A part relpath would change: empty ("a//b", a leading or trailing "/"), "." or "..".
NOT_NORMAL = r"(^|/)(\.{1,2})?(/|$)"


# Sub-prefixes listed at once: a bucket of millions of objects takes hours to list with one paginated
# listing; its sub-prefixes listed side by side take that divided by this, within the store's request limits.
LISTING_THREADS = 16


def find_in_parallel(fs, root: str) -> dict[str, dict]:
    """Every file under `root` with its details (as `fs.find(root, detail=True)`), its first-level sub-prefixes
    listed side by side (one paginated listing each instead of one for the whole tree)."""
    from concurrent.futures import ThreadPoolExecutor

    top = fs.ls(root, detail=True)
    found = {entry["name"]: entry for entry in top if entry.get("type") != "directory"}
    folders = [entry["name"] for entry in top if entry.get("type") == "directory"]
    if len(folders) < 2:
        return {**found, **(fs.find(folders[0], detail=True) if folders else {})}
    with ThreadPoolExecutor(max_workers=min(LISTING_THREADS, len(folders)), thread_name_prefix="raypose-list") as pool:
        for listed in pool.map(lambda folder: fs.find(folder, detail=True), folders):
            found.update(listed)
    return found


def _with_container_facts(table: pa.Table, files: pa.Table) -> pa.Table:
    """An image inside a tar or Parquet file changes when its container does: its version is the container's
    (and its size a tar member's length)."""
    at = pc.index_in(table.column("container"), files.column("image_uri"))
    version = pc.take(files.column("image_version"), at)
    size = table.column("length") if "length" in table.column_names else pa.nulls(table.num_rows, pa.int64())
    return table.append_column("image_size", pc.cast(size, pa.int64())).append_column("image_version", version)


def object_facts(infos) -> tuple[pa.Array, pa.Array]:
    """What a store's listing says of each object's content: its size, and a version (ETag, generation, mtime)."""
    infos = list(infos)
    sizes = pa.array([info.get("size") for info in infos], pa.int64())
    versions = pa.array([_version_of(info) for info in infos], pa.string())
    return sizes, versions


# Listing fields that change when an object's content does, by store: S3 and Azure ETags, GCS generations,
# modification times (local disk, and stores without the others).
VERSION_FIELDS = ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified", "updated", "created")


def _version_of(info: dict) -> str | None:
    for name in VERSION_FIELDS:
        value = info.get(name)
        if value is not None:  # ETags as S3 Inventory writes them: without the quotes a listing gives
            return f"ETag:{str(value).strip(chr(34))}" if name.lower() == "etag" else f"{name}:{value}"
    return None


def _call(fn, *args, url: str, **kwargs):
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError as exc:
        raise SpecError(f"images.path: {url} does not exist") from exc
    except PermissionError as exc:
        raise SpecError(f"images.path: permission denied listing {url}: {exc}") from exc
    except OSError as exc:
        raise SpecError(f"images.path: cannot list {url}: {exc}") from exc


def _wanted(table: pa.Table, suffixes: tuple[str, ...]) -> pa.Table:
    """The listed files that are images: a wanted suffix, and no hidden part in the key."""
    keys = table.column("image_key")
    return filtered(table, pc.and_(pc.match_substring_regex(pc.utf8_lower(keys), _suffix_pattern(suffixes)),
                                   pc.invert(pc.match_substring_regex(keys, HIDDEN))))


def _list_manifest(fs, manifest: str) -> tuple[pa.Array, pa.Array]:
    """A manifest's (keys, paths) (`_manifest_entries`), read whole."""
    try:
        with fs.open(manifest, "rb") as f:
            lines = _manifest_lines(f)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SpecError(f"images.path: cannot read manifest {manifest}: {exc}") from exc
    return _manifest_entries(fs, manifest, lines)


def _manifest_entries(fs, manifest: str, lines: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Manifest lines as (keys, paths): URLs keyed by what follows `://`, absolute paths by themselves without
    the leading `/`, relative ones by their normalised path and read from the manifest's folder."""
    lines = lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines
    # At millions of lines each copy of the column costs more than the compute: copy only what changes.
    if _may_need_trim(lines):
        lines = pc.utf8_trim_whitespace(lines)
    lines = filtered(lines, pc.invert(pc.or_(pc.equal(lines, ""), pc.starts_with(lines, "#"))))
    url = pc.match_substring(lines, "://")
    absolute = pc.and_(pc.invert(url), pc.starts_with(lines, "/"))
    relative = np.asarray(pc.invert(pc.or_(url, absolute)))
    if pc.all(url).as_py() is not False:
        keys = _after_scheme(lines)
    else:
        keys = pc.if_else(url, _after_scheme(lines), pc.utf8_ltrim(lines, "/"))
    paths = lines
    if relative.any():
        # Object stores take "a/../b" literally, so "../images/x.jpg" must be resolved here.
        base = posixpath.dirname(manifest)
        entries = lines.filter(pa.array(relative)).to_pylist()
        at = np.flatnonzero(relative)
        keys = _put(keys, at, [posixpath.normpath(e) for e in entries])
        paths = _put(paths, at, [posixpath.normpath(posixpath.join(base, e)) for e in entries])
    return keys, paths


def _after_scheme(lines: pa.Array) -> pa.Array:
    """Each URL without its `scheme://` (what the key of a URL entry is)."""
    first = lines[0].as_py() if len(lines) else ""
    prefix = first[: first.find("://") + 3] if "://" in first else ""
    if prefix and ":" not in prefix[:-3] and pc.all(pc.starts_with(lines, prefix)).as_py():
        # One scheme for all (the usual manifest): a byte slice, no regex (the prefix is ASCII).
        return pc.binary_slice(lines.cast(pa.binary()), len(prefix), (1 << 31) - 1).cast(pa.string())
    return pc.replace_substring_regex(lines, r"^[^:]*://", "")


def _may_need_trim(lines: pa.Array) -> bool:
    """Whether a line may start or end with whitespace: its first or last byte is ASCII whitespace or not ASCII."""
    if not len(lines):
        return False
    offsets = np.frombuffer(lines.buffers()[1], np.int32, len(lines) + 1, lines.offset * 4)
    data = np.frombuffer(lines.buffers()[2] or b"", np.uint8)
    filled = offsets[1:] > offsets[:-1]
    ends = np.concatenate([data[offsets[:-1][filled]], data[offsets[1:][filled] - 1]])
    return bool(np.isin(ends, WHITESPACE_BYTES).any() or (ends >= 0x80).any())


WHITESPACE_BYTES = np.array([9, 10, 11, 12, 13, 28, 29, 30, 31, 32], np.uint8)  # what utf8_trim_whitespace trims in ASCII


def _manifest_lines(f) -> pa.Array:
    """A text file's lines as one Arrow string array (read by Arrow's CSV reader: one column, no quoting);
    a line that is not UTF-8 is kept, its undecodable bytes `%XX` as in any listed name (`names`)."""
    from pyarrow import csv

    table = csv.read_csv(f, read_options=csv.ReadOptions(column_names=["line"]), parse_options=MANIFEST_PARSE,
                         convert_options=MANIFEST_CONVERT)
    return _text_lines(table.column("line").combine_chunks())


def _text_lines(lines: pa.Array) -> pa.Array:
    """Manifest lines read as bytes, as strings: checked as UTF-8 at once (as Arrow's reader would), and where
    one is not, its undecodable bytes written `%XX` as in any listed name (`names`)."""
    try:
        return lines.cast(pa.string())
    except pa.ArrowInvalid:
        return name_array([line.decode("utf-8", "surrogateescape") for line in lines.to_pylist()])


def _manifest_csv():
    from pyarrow import csv

    return (csv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False),
            csv.ConvertOptions(column_types={"line": pa.binary()}, strings_can_be_null=False))


MANIFEST_PARSE, MANIFEST_CONVERT = _manifest_csv()  # one column a line: no delimiter, quoting or nulls


def _put(values: pa.Array, at: np.ndarray, new: list[str]) -> pa.Array:
    mask = np.zeros(len(values), bool)
    mask[at] = True
    return pc.replace_with_mask(values, pa.array(mask), pa.array(new, pa.string()))


def _uris(fs, paths: pa.Array) -> pa.Array:
    """Paths on `fs` as the URIs raypose records (`storage.uri_of`), whole columns at a time."""
    prefix = uri_of(fs, "/x")[: -len("/x")]  # what the filesystem puts before a path: file://, memory://, ...
    with_protocol = pc.match_substring(paths, "://")
    if pc.all(with_protocol).as_py() is not False:
        return paths
    return pc.if_else(with_protocol, paths, pc.binary_join_element_wise(prefix, paths, ""))


def _suffix_pattern(suffixes: tuple[str, ...]) -> str:
    return "(" + "|".join(re.escape(s) for s in suffixes) + ")$"


def _last_of_each_key(table: pa.Table) -> pa.Table:
    """The table sorted by key, one row a key: the last of the rows that share it."""
    keys = table.column("image_key").combine_chunks()
    if len(keys) < 2:
        return table
    if not ascending(keys):
        table = table.take(pc.sort_indices(table, [("image_key", "ascending")]))  # stable: equal keys keep their order
        keys = table.column("image_key").combine_chunks()
    last = np.ones(len(keys), bool)
    last[:-1] = np.asarray(pc.not_equal(keys.slice(0, len(keys) - 1), keys.slice(1)))
    return filtered(table, pa.array(last))


# A hidden part of a key: ".name" or "..name", but not "." or "..", which are a manifest entry's way up.
HIDDEN = r"(^|/)\.([^./][^/]*|\.[^/]+)(/|$)"
