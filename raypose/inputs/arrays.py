"""Arrow column helpers for the plan's millions of rows, where each copy of a column costs more than the compute."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class NotSorted(Exception):
    """Rows read in key order turned out not to be sorted past their first block (the plan reads them whole)."""


def filtered(values: pa.Array | pa.Table, mask: pa.Array | pa.ChunkedArray) -> pa.Array | pa.Table:
    """`values.filter(mask)` (an array or a table), or `values` itself when the mask keeps every row."""
    keeps_all = mask.null_count == 0 and pc.all(mask).as_py() is not False  # a null in the mask drops its row
    return values if keeps_all else values.filter(mask)


def ascending(values: pa.Array) -> bool:
    """Whether an array is sorted ascending (ties allowed)."""
    return len(values) < 2 or pc.all(pc.less_equal(values.slice(0, len(values) - 1), values.slice(1))).as_py()


class KeySequence:
    """A sorted Arrow string array as a sequence `bisect` can search without turning it into Python strings."""

    def __init__(self, keys: pa.Array):
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> str:
        return self.keys[index].as_py()


# splitmix64's constants: a cheap mix with good avalanche, so nearby values (sizes, mtimes) spread.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_BYTE_BASE = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: the polynomial base for bytes
_NULL = np.uint64(0x6E756C6C)


def _mix(values: np.ndarray) -> np.ndarray:
    z = values + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def row_hashes(columns: list[pa.Array | pa.ChunkedArray]) -> np.ndarray:
    """A 64-bit hash of each row over `columns` (numbers, strings, lists of them, nulls), computed a column at a
    time in numpy: the plan fingerprints millions of images without a Python object per row. Not cryptographic:
    it tells whether an image's listed facts changed, not whether someone forged them."""
    n = len(columns[0]) if columns else 0
    hashes = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        for position, column in enumerate(columns):
            column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            hashes = _mix(hashes * _BYTE_BASE + _array_hashes(column) + np.uint64(position))
    return hashes


def _array_hashes(array: pa.Array) -> np.ndarray:
    """One uint64 per element of `array` (its nulls hash alike)."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        array, kind = array.dictionary_decode(), array.type.value_type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        if pa.types.is_fixed_size_list(kind):
            size = kind.list_size
            offsets = (np.arange(len(array) + 1, dtype=np.int64) + array.offset) * size
        else:
            offsets = np.asarray(array.offsets, np.int64)
        values = array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        hashed = _sequence_hashes(_array_hashes(values), offsets - offsets[0])
    elif pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_string(kind) \
            or pa.types.is_large_binary(kind):
        width = np.int64 if pa.types.is_large_string(kind) or pa.types.is_large_binary(kind) else np.int32
        offsets = np.frombuffer(array.buffers()[1], width, len(array) + 1,
                                array.offset * np.dtype(width).itemsize).astype(np.int64)
        data = np.frombuffer(array.buffers()[2], np.uint8) if array.buffers()[2] is not None else np.zeros(0, np.uint8)
        data = data[offsets[0]:offsets[-1]].astype(np.uint64)
        hashed = _sequence_hashes(data, offsets - offsets[0])
    elif pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind) \
            or pa.types.is_timestamp(kind):
        numbers = array.cast(pa.float64()) if pa.types.is_floating(kind) else array.cast(pa.int64())
        values = np.asarray(numbers.fill_null(0).to_numpy(zero_copy_only=False))
        hashed = _mix(values.view(np.uint64) if values.dtype == np.float64 else values.astype(np.int64).view(np.uint64))
    elif pa.types.is_null(kind):
        hashed = np.zeros(len(array), np.uint64)
    else:
        raise TypeError(f"row_hashes: cannot hash a {kind} column")
    if array.null_count:
        hashed = np.where(np.asarray(array.is_null()), _NULL, hashed)
    return hashed


def _sequence_hashes(elements: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """A polynomial hash of each run `elements[offsets[i]:offsets[i+1]]` (its length mixed in)."""
    lengths = np.diff(offsets)
    sums = np.zeros(len(lengths), np.uint64)
    if len(elements):
        positions = np.arange(len(elements), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        powers = np.cumprod(np.full(int(lengths.max()), _BYTE_BASE, np.uint64))
        starts = np.minimum(offsets[:-1], len(elements) - 1)
        sums = np.where(lengths > 0, np.add.reduceat(elements * powers[positions], starts), np.uint64(0))
    return _mix(sums ^ _mix(lengths.astype(np.uint64)))
