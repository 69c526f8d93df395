"""The device crop plan's Arrow encoding: crop rows carrying their image's encoded bytes, and the images read back.

`plan_crops` tasks (`resources.crop_in: pose_device`) write it; the pose actor's `DeviceCropper` reads it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raypose.imaging.decode_device import EncodedImage

# What `plan_crops` adds to each crop row for the device: its image's encoded bytes (a dictionary
# column, so an image's bytes are held once however many crops it gives and however Ray Data
# batches the rows), the region of it to decode (null: whole) and whether a GPU JPEG decoder takes it.
SOURCE_FIELDS = [
    pa.field("source", pa.dictionary(pa.int32(), pa.large_binary())),
    pa.field("source_region", pa.list_(pa.int32(), 4)),
    pa.field("source_plain_jpeg", pa.bool_()),
]


def with_sources(rows: pa.Table, images: list[EncodedImage]) -> pa.Table:
    """The crop rows with each crop's image (`SOURCE_FIELDS`); rows without a crop to cut get nulls."""
    n = rows.num_rows
    index = np.full(n, -1, np.int32)
    region = np.zeros((n, 4), np.int32)
    has_region, plain = np.zeros(n, bool), np.zeros(n, bool)
    for k, image in enumerate(images):
        index[image.rows], plain[image.rows] = k, image.plain_jpeg
        if image.region is not None:
            region[image.rows], has_region[image.rows] = image.region, True
    views = [np.frombuffer(image.data, np.uint8) for image in images]
    offsets = np.zeros(len(views) + 1, np.int64)
    np.cumsum([v.size for v in views], out=offsets[1:])
    data = np.concatenate(views) if views else np.empty(0, np.uint8)
    encoded = pa.Array.from_buffers(pa.large_binary(), len(views), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    missing = index < 0
    columns = {
        "source": pa.DictionaryArray.from_arrays(pa.array(index, mask=missing), encoded),
        "source_region": pa.FixedSizeListArray.from_arrays(pa.array(region.reshape(-1)), 4,
                                                           mask=pa.array(~has_region)),
        "source_plain_jpeg": pa.array(plain, mask=missing),
    }
    for source_field in SOURCE_FIELDS:
        rows = rows.append_column(source_field, columns[source_field.name])
    return rows


def planned_images(rows: pa.Table) -> list[EncodedImage]:
    """The images `plan_crops` recorded for these crop rows, each with its rows (in this table) and region."""
    keys = rows.column("image_key").to_pylist()
    widths, heights = rows.column("image_width").to_pylist(), rows.column("image_height").to_pylist()
    regions = rows.column("source_region").to_pylist()
    plain = rows.column("source_plain_jpeg").to_pylist()
    images: dict[tuple, EncodedImage] = {}
    first = 0  # the chunk's first row in the table
    for number, chunk in enumerate(rows.column("source").chunks):
        encoded = chunk.dictionary
        # Each image's bytes as a zero-copy slice of the values buffer (an Arrow scalar per image costs ~0.15 ms).
        offsets = np.frombuffer(encoded.buffers()[1], np.int64)[encoded.offset:]
        data = encoded.buffers()[2]
        for row, index in enumerate(chunk.indices.fill_null(-1).to_numpy().tolist(), start=first):
            if index < 0:
                continue
            # Identical bytes of two images may share an entry: each image keeps its own region.
            image = images.get((number, index, keys[row]))
            if image is None:
                region = tuple(regions[row]) if regions[row] is not None else None
                image = images[(number, index, keys[row])] = EncodedImage(
                    data.slice(int(offsets[index]), int(offsets[index + 1] - offsets[index])),
                    (widths[row], heights[row]), plain[row], region=region)
            image.rows.append(row)
        first += len(chunk)
    return list(images.values())
