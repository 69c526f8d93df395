"""Arrow column helpers for the plan's millions of rows, where each copy of a column costs more than the compute."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


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
