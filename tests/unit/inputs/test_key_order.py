"""Rows sorted by key through spilled runs: the order of a stable sort of the whole table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from raypose.inputs.key_order import sorted_by_key
from raypose.schema import BOX_SCHEMA


def box_rows(keys: list[str]) -> pa.Table:
    n = len(keys)
    return pa.table({
        "image_key": keys,
        "bbox": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(4 * n, dtype=np.float32)), 4),
        "annotation_id": pa.array(range(n), pa.int64()),  # the row's place in the table
        "category": ["person"] * n, "score": pa.array([0.5] * n, pa.float32()),
        "expected_width": pa.array([None] * n, pa.int32()), "expected_height": pa.array([None] * n, pa.int32()),
    }, schema=BOX_SCHEMA)


@pytest.mark.parametrize(("run_rows", "batch_rows"), [(1 << 20, 8192), (50, 7), (13, 1)])
def test_runs_merged_give_the_stable_sort_of_the_whole_table(run_rows, batch_rows):
    rng = np.random.default_rng(3)
    # Few distinct keys, so one key's rows fall in many runs and fill many batches of one run.
    table = box_rows([f"img_{k:03d}.jpg" for k in rng.integers(0, 40, 700)])
    chunks = [table.slice(start, 60) for start in range(0, table.num_rows, 60)]
    out = list(sorted_by_key(iter(chunks), BOX_SCHEMA, run_rows=run_rows, batch_rows=batch_rows))
    merged = pa.concat_tables(out)
    expected = table.take(pc.sort_indices(table, [("image_key", "ascending")]))
    assert merged.to_pylist() == expected.to_pylist()
    firsts = [t.column("image_key")[0].as_py() for t in out if t.num_rows]
    lasts = [t.column("image_key")[-1].as_py() for t in out if t.num_rows]
    assert all(last < first for last, first in zip(lasts, firsts[1:]))  # a key's rows come in one table


def test_no_rows_give_no_tables_and_the_runs_are_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert list(sorted_by_key(iter([box_rows([])]), BOX_SCHEMA)) == []
    assert len(list(sorted_by_key(iter([box_rows(["b", "a", "b"])]), BOX_SCHEMA, run_rows=1, batch_rows=1))) == 2
    assert list(tmp_path.iterdir()) == []
