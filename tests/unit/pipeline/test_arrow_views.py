"""Zero-copy views: Pillow's pixels, crop columns as arrays, crops written into one buffer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image

from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.geometry import center_scale_from_boxes
from raypose.pipeline.arrow_views import binary_column, crop_array, pixel_view, single_block_images


def test_pixel_view_is_the_images_pixels_without_a_copy():
    single_block_images()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    view = pixel_view(image)
    assert view.shape == (90, 120, 4) and not view.flags.owndata
    np.testing.assert_array_equal(view[..., :3], np.asarray(image))
    center, scale = center_scale_from_boxes(np.array([10.0, 5.0, 60.0, 80.0]), (48, 64))
    np.testing.assert_array_equal(
        crop_image(view, center[0], scale[0], (48, 64)), crop_image(np.asarray(image), center[0], scale[0], (48, 64))
    )


def test_pixel_view_of_an_image_in_several_blocks_is_the_image():
    size = Image.core.get_block_size()
    Image.core.set_block_size(4096)  # a 120x90 RGB image (43 KB) then spans several blocks
    try:
        image = Image.new("RGB", (120, 90), (10, 20, 30))
        assert pixel_view(image) is image
    finally:
        Image.core.set_block_size(size)


def test_binary_column_holds_the_bytes_and_nulls_in_bounded_chunks():
    values = [np.arange(6, dtype=np.uint8).reshape(2, 3), None, np.zeros(0, np.uint8), np.full(4, 7, np.uint8), None]
    expected = [bytes(range(6)), None, b"", b"\x07" * 4, None]
    whole = binary_column(values)
    assert whole.type == pa.binary() and whole.num_chunks == 1 and whole.to_pylist() == expected
    chunked = binary_column(values, chunk_bytes=6)
    assert [len(c) for c in chunked.chunks] == [3, 2] and chunked.to_pylist() == expected
    assert binary_column([]).to_pylist() == [] and binary_column([None]).to_pylist() == [None]


def test_crop_array_is_the_rows_crops_whether_viewed_or_copied():
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (6, 4, 3, 3), dtype=np.uint8)
    values = [c.tobytes() for c in crops]
    values[4] = None  # a failed row
    column = pa.array(values, pa.binary()).slice(1)  # an offset into the buffers, as a Ray Data batch has
    view = crop_array(column, [0, 1, 2], (3, 4))
    assert not view.flags.owndata  # consecutive rows: the column's own bytes
    np.testing.assert_array_equal(view, crops[1:4])
    np.testing.assert_array_equal(crop_array(column, [0, 2, 4], (3, 4)), crops[[1, 3, 5]])
    np.testing.assert_array_equal(crop_array(column, [2, 4], (3, 4)), crops[[3, 5]])  # a null row between

