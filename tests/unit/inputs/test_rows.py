"""A Dataset's rows -> image tasks: every kind of image column, keys, boxes filtered as a job's, failures as data."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raypose.config.spec import BoxesSpec, ImagesSpec
from raypose.errors import SpecError
from raypose.imaging.decode import decode_image
from raypose.inputs.rows import image_tasks_of_rows
from raypose.schema import IMAGE_TASK_SCHEMA

IMAGES = ImagesSpec(path="(dataset)")
INLINE = BoxesSpec(source="inline")


def jpeg(color=(200, 10, 10), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def tasks(batch: pa.Table, images: ImagesSpec = IMAGES, boxes: BoxesSpec = INLINE, working_dir: str = "/w") -> list[dict]:
    table = image_tasks_of_rows(batch, images=images, boxes=boxes, working_dir=working_dir)
    assert table.schema == IMAGE_TASK_SCHEMA
    return table.to_pylist()


def test_encoded_bytes_with_paths_become_tasks_keyed_under_the_root():
    data = [jpeg(), jpeg((0, 0, 255))]
    batch = pa.table({"image": data, "path": ["imgs/a.jpg", "/elsewhere/b.jpg"],  # relative to where it was made
                      "bbox": [[[1, 2, 10, 12]], [[0, 0, 5, 5], [3, 3, 4, 4]]],
                      "annotation_id": [[7], [8, 9]]})
    [a, b] = tasks(batch, ImagesSpec(path="/data/imgs"), working_dir="/data")
    assert (a["image_key"], a["image_uri"]) == ("a.jpg", "file:///data/imgs/a.jpg")
    assert (b["image_key"], b["image_uri"]) == ("/elsewhere/b.jpg", "file:///elsewhere/b.jpg")
    assert a["image_bytes"] == data[0] and b["image_bytes"] == data[1]
    assert b["box_xywh"] == [[0, 0, 5, 5], [3, 3, 4, 4]] and b["annotation_id"] == [8, 9]
    assert a["box_source"] == "inline" and a["category"] == ["person"] and a["shard"] == 0
    assert a["error_stage"] is None and not a["needs_detection"]


def test_hf_structs_give_their_paths_as_keys_and_decoded_arrays_their_exact_pixels():
    struct = pa.table({"image": [{"bytes": jpeg(), "path": "x/./y.jpg"}], "bbox": [[[1, 1, 5, 5]]]})
    assert tasks(struct)[0]["image_key"] == "x/y.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    grey = np.full((5, 4, 1), 77, np.uint8)  # a trailing channel of one: a grey image
    listed = pa.table({"image": pa.array([pixels.tolist(), grey.tolist()]), "bbox": [[[0, 0, 4, 4]]] * 2})
    first, second = tasks(listed)
    assert np.array_equal(np.asarray(decode_image(first["image_bytes"], 10**6)), pixels)
    assert np.asarray(decode_image(second["image_bytes"], 10**6))[0, 0].tolist() == [77, 77, 77]
    assert first["image_key"].startswith("sha1:") and first["image_key"] != second["image_key"]
    assert first["image_uri"] is None


def test_ray_tensor_columns_are_read_as_images():
    from ray.data.extensions import ArrowVariableShapedTensorArray

    arrays = np.array([np.zeros((4, 5, 3), np.uint8), np.full((2, 3, 3), 9, np.uint8)], dtype=object)
    batch = pa.table({"image": ArrowVariableShapedTensorArray.from_numpy(arrays), "bbox": [[[0, 0, 2, 2]]] * 2})
    decoded = [np.asarray(decode_image(t["image_bytes"], 10**6)) for t in tasks(batch)]
    assert [d.shape for d in decoded] == [(4, 5, 3), (2, 3, 3)] and decoded[1].max() == 9


def test_unusable_images_and_boxes_are_the_rows_failures_not_the_batchs():
    batch = pa.table({"image": pa.array([None, jpeg()], pa.binary()),
                      "bbox": [[[1, 1, 3, 3]], [[1, 1, 3], [0, 0, 2, 2]]]})  # a box of three numbers
    first, second = tasks(batch)
    assert (first["error_stage"], first["error_reason"]) == ("read", "no image in the row (null)")
    assert second["error_stage"] is None
    assert np.isnan(second["box_xywh"][0][3]) and second["box_xywh"][1] == [0, 0, 2, 2]  # reported per box later
    bad_array = pa.table({"image": pa.array([[[1, 2], [3]]]), "bbox": [[[0, 0, 1, 1]]]})  # ragged: no image
    assert tasks(bad_array)[0]["error_stage"] == "decode"


def test_boxes_are_filtered_as_a_jobs_and_rows_left_without_any_are_skipped_unless_detected():
    batch = pa.table({"image": [jpeg(), jpeg()], "path": ["a.jpg", "b.jpg"],
                      "bbox": [[[0, 0, 4, 4], [0, 0, 9, 9]], [[0, 0, 3, 3]]],
                      "category": [["person", "dog"], ["dog"]], "score": [[0.9, 0.8], [0.2]]})
    [only] = tasks(batch)
    assert only["image_key"] == "/w/a.jpg" and only["box_xywh"] == [[0, 0, 4, 4]] and only["box_score"] == [
        pytest.approx(0.9)]
    kept = tasks(batch, boxes=BoxesSpec(source="inline", categories=None, min_score=0.5))
    assert [t["box_xywh"] for t in kept] == [[[0, 0, 4, 4], [0, 0, 9, 9]]]
    detect_rest = tasks(batch, boxes=BoxesSpec(source="inline", detect_missing=True))
    assert [(t["image_key"], t["needs_detection"]) for t in detect_rest] == [("/w/a.jpg", False), ("/w/b.jpg", True)]
    detector = tasks(batch.drop_columns(["bbox"]), boxes=BoxesSpec(source="detector"))
    assert [(t["box_xywh"], t["needs_detection"], t["box_source"]) for t in detector] == [([], True, None)] * 2


def test_a_missing_column_is_a_spec_error_naming_the_field():
    batch = pa.table({"img": [jpeg()], "bbox": [[[0, 0, 1, 1]]]})
    with pytest.raises(SpecError, match=r"images.image_column: 'image' is not a column of the Dataset \(columns: img"):
        tasks(batch)
    with pytest.raises(SpecError, match=r"boxes.bbox_column: 'boxes' is not a column.*boxes.source: detector"):
        tasks(batch.rename_columns(["image", "bbox"]), boxes=BoxesSpec(source="inline", bbox_column="boxes"))
    with pytest.raises(SpecError, match="images.key_column: 'id'"):
        tasks(batch.rename_columns(["image", "bbox"]), ImagesSpec(path="(dataset)", key_column="id"))
    with pytest.raises(SpecError, match="images.image_column: 'image' holds int64"):
        tasks(pa.table({"image": [1], "bbox": [[[0, 0, 1, 1]]]}))
