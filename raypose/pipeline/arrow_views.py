"""Zero-copy views between Arrow columns, numpy arrays and Pillow's buffers, where a copy costs as much as the work.

The crop column read as (N, H, W, 3) arrays, pair columns as (N, 2), crops written into one
binary buffer, and Pillow's pixels seen without repacking them (benchmarks/README.md measures each).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image


def crop_array(column: pa.BinaryArray, rows: list[int], input_size: tuple[int, int]) -> np.ndarray:
    """The crops of some rows of a binary column as one (N, H, W, 3) uint8 array.

    Consecutive rows (one expert's forward batch, no failed row among them) are a read-only
    view of the column's buffer: on a GPU host the copy of a large batch was a sixth of the
    actor's host time per batch (benchmarks/README.md).
    """
    width, height = input_size
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset :]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
    first, n = (rows[0] if rows else 0), len(rows)
    span = offsets[first : first + n + 1]
    if n and rows == list(range(first, first + n)) and np.all(np.diff(span) == width * height * 3):
        return data[span[0] : span[-1]].reshape(n, height, width, 3)
    out = np.empty((len(rows), height, width, 3), dtype=np.uint8)
    for j, i in enumerate(rows):
        out[j] = data[offsets[i] : offsets[i + 1]].reshape(height, width, 3)
    return out


def pairs(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<float32, 2> column as (N, 2); null rows read as NaN."""
    return fixed_lists(column, 2)


def fixed_lists(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed_size_list<float32, width> column as float32 (N, width), whatever a null row's slots hold."""
    lists = column.combine_chunks()
    values = lists.values.slice(lists.offset * width, len(lists) * width)  # .values ignores the offset
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


def binary_column(values: list[np.ndarray | None], chunk_bytes: int = 2**31 - 1) -> pa.ChunkedArray:
    """uint8 arrays (None for a null) -> a binary column, each copied once into one buffer per chunk.

    `pa.array` of `tobytes()` copies each crop twice, which costs as much as cutting it
    (benchmarks/README.md). A chunk holds at most `chunk_bytes` (binary's offsets are int32).
    """
    chunks, start, size = [], 0, 0
    for end, value in enumerate(values + [None]):
        nbytes = 0 if value is None else value.nbytes
        if end == len(values) or (size + nbytes > chunk_bytes and end > start):
            part = values[start:end]
            valid = np.array([v is not None for v in part])
            offsets = np.zeros(len(part) + 1, dtype=np.int32)
            np.cumsum([0 if v is None else v.nbytes for v in part], out=offsets[1:])
            present = [v.reshape(-1) for v in part if v is not None]
            data = np.concatenate(present) if present else np.empty(0, np.uint8)
            bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if not valid.all() else None
            chunks.append(pa.Array.from_buffers(pa.binary(), len(part), [bitmap, pa.py_buffer(offsets), pa.py_buffer(data)]))
            start, size = end, 0
        size += nbytes
    return pa.chunked_array(chunks, pa.binary())


# Pillow keeps an image in 16 MiB blocks by default; one block per image (up to this size)
# lets `pixel_view` see it without a copy.
SINGLE_BLOCK_BYTES = 256 << 20


def pixel_view(image: Image.Image) -> np.ndarray | Image.Image:
    """An RGB image's pixels as a zero-copy (h, w, 4) RGBX view of Pillow's own buffer.

    `np.asarray(image)` repacks every pixel, which costs as much as decoding a large photo
    (benchmarks/README.md); Pillow's Arrow export does not. An image held in several blocks is returned as is.
    """
    if image.mode != "RGB":
        return image
    try:
        exported = pa.array(image)
    except ValueError:  # rows not contiguous: an image larger than one block
        return image
    width, height = image.size
    return np.frombuffer(exported.buffers()[-1], dtype=np.uint8)[: width * height * 4].reshape(height, width, 4)


def single_block_images() -> None:
    """Have Pillow hold each image (up to `SINGLE_BLOCK_BYTES`) in one block, which `pixel_view` can see."""
    if Image.core.get_block_size() < SINGLE_BLOCK_BYTES:
        Image.core.set_block_size(SINGLE_BLOCK_BYTES)
