"""Column names and Arrow schemas, defined once and imported everywhere.

Only plain Arrow types (no Ray tensor extension types), so DuckDB, Polars, Spark and
pandas read the output without raypose installed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# One row per image going into the crop stage.
IMAGE_TASK_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("image_uri", pa.string()),
        ("container", pa.string()),  # the tar or Parquet file holding the image, if any
        ("offset", pa.int64()),  # tar: the member's byte offset; Parquet: the row
        ("length", pa.int64()),  # tar: the member's size
        ("image_size", pa.int64()),  # bytes, as the store lists the file (or the tar member)
        ("image_version", pa.string()),  # what the store says of the object's content: ETag, generation or mtime
        ("expected_width", pa.int32()),  # from the boxes file, when it says
        ("expected_height", pa.int32()),
        ("box_xywh", pa.list_(pa.list_(pa.float64(), 4))),
        ("annotation_id", pa.list_(pa.int64())),
        ("category", pa.list_(pa.string())),
        ("box_score", pa.list_(pa.float32())),
        ("box_source", pa.string()),  # gt | table | detector
        ("detector_id", pa.string()),
        ("needs_detection", pa.bool_()),
        ("image_bytes", pa.binary()),  # set when an earlier stage (the detector) already read the image
        ("error_stage", pa.string()),  # set when an earlier stage failed on this image
        ("error_reason", pa.string()),
        ("shard", pa.int32()),
        ("input_fingerprint", pa.int64()),  # a hash of the columns above that decide the image's rows (resume.py)
        # An image with more boxes than a block takes is cut into parts (pipeline/blocks.py): the
        # instance index of the part's first box, and the image's boxes in all its parts; null when whole.
        ("box_offset", pa.int32()),
        ("image_boxes", pa.int32()),
        # A video's frame (images.format: video; inputs/video.py): its index and presentation timestamp in
        # the stream, its time in seconds, and the video's frame rate.
        ("frame_index", pa.int64()),
        ("frame_pts", pa.int64()),
        ("frame_time", pa.float64()),
        ("video_fps", pa.float64()),
    ]
)

# The job's boxes before they meet the images: one row per box, in the boxes file's order.
BOX_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("bbox", pa.list_(pa.float64(), 4)),  # COCO xywh; a malformed box is NaN, reported per box later
        ("annotation_id", pa.int64()),
        ("category", pa.string()),
        ("score", pa.float32()),
        ("expected_width", pa.int32()),  # the size the boxes file says the image has
        ("expected_height", pa.int32()),
    ]
)

# What every instance row carries, from the crop stage to the output.
INSTANCE_FIELDS = [
    pa.field("image_key", pa.string(), nullable=False),
    pa.field("image_uri", pa.string()),
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
    pa.field("instance_index", pa.int32()),
    pa.field("annotation_id", pa.int64()),
    pa.field("category", pa.string()),
    pa.field("bbox", pa.list_(pa.float32(), 4)),  # COCO xywh in image pixels, as cropped (clipped)
    pa.field("box_score", pa.float32()),  # null for ground-truth boxes
    pa.field("box_source", pa.string()),  # gt | table | detector
    pa.field("detector_id", pa.string()),  # the detector checkpoint, for detected boxes
    # A video's frame: its index in the stream, its time (s, from its timestamp) and the video's frame rate; null for images.
    pa.field("frame_index", pa.int64()),
    pa.field("frame_time", pa.float64()),
    pa.field("video_fps", pa.float64()),
]

# Failures travel in the stream with the rows; the writer routes them to the errors table.
# `shard` and `image_rows` (how many rows the image produced) let the writer tell when every
# image of a shard is in, so it can commit the shard.
FAILURE_FIELDS = [
    pa.field("error_stage", pa.string()),
    pa.field("error_reason", pa.string()),
    pa.field("shard", pa.int32()),
    pa.field("image_rows", pa.int32()),
]

POSE_FIELDS = [
    pa.field("expert", pa.string()),
    pa.field("keypoint_schema", pa.string()),
    pa.field("keypoint_x", pa.list_(pa.float32())),
    pa.field("keypoint_y", pa.list_(pa.float32())),
    pa.field("keypoint_score", pa.list_(pa.float32())),
    pa.field("instance_score", pa.float32()),
]

# How far the plain and the mirrored crop's predictions disagree (`imaging/uncertainty.py`);
# null where pose.uncertainty is off.
UNCERTAINTY_FIELDS = [
    pa.field("keypoint_flip_error", pa.list_(pa.float32())),  # per keypoint, in input-crop pixels
    pa.field("flip_oks", pa.float32()),
    pa.field("instance_doubt", pa.float32()),  # 1 - box score x mean(keypoint score x flip agreement): highest first
]

RUN_FIELDS = [
    pa.field("model_id", pa.string()),
    pa.field("model_revision", pa.string()),
    pa.field("job_id", pa.string()),
]


# Rows out of the crop stage: instance fields, the expert that will label the crop, the crop's
# geometry and its uint8 HWC pixels at that expert's input size.
CROP_SCHEMA = pa.schema(
    INSTANCE_FIELDS
    + [
        pa.field("expert", pa.string()),
        pa.field("center", pa.list_(pa.float32(), 2)),
        pa.field("scale", pa.list_(pa.float32(), 2)),
        pa.field("crop", pa.binary()),
    ]
    + FAILURE_FIELDS
)


# Which pose actor made a row ("node id:pid"): the writer tallies the layout that ran.
WORKER_FIELD = pa.field("pose_worker", pa.string())

POSE_OUTPUT_SCHEMA = pa.schema(INSTANCE_FIELDS + POSE_FIELDS + FAILURE_FIELDS + [WORKER_FIELD] + UNCERTAINTY_FIELDS)

# The instance's track across its video's frames (pose.track; output/tracks.py); null otherwise.
TRACK_FIELD = pa.field("track_id", pa.int64())

KEYPOINTS_SCHEMA = pa.schema(
    [RUN_FIELDS[2]] + INSTANCE_FIELDS + POSE_FIELDS + RUN_FIELDS[:2] + UNCERTAINTY_FIELDS + [TRACK_FIELD]
)

# What `raypose.annotate` gives per row: the keypoints table's columns but the job's, and a failure's stage and
# reason (null for a labelled instance; a failure's keypoint columns are null).
ANNOTATED_SCHEMA = pa.schema(INSTANCE_FIELDS + POSE_FIELDS + RUN_FIELDS[:2] + UNCERTAINTY_FIELDS + FAILURE_FIELDS[:2])

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string()),
        pa.field("image_key", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("instance_index", pa.int32()),
        pa.field("stage", pa.string()),  # list | read | decode | boxes | crop | pose
        pa.field("reason", pa.string()),
    ]
)

# Reviewers' corrections (`raypose import`): one row per instance an annotation covered, keyed to
# the keypoints table's (image_key, instance_index), or to a new instance the reviewer added.
CORRECTIONS_SCHEMA = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("instance_index", pa.int32()),  # null: an instance the reviewer added
        pa.field("new_instance", pa.string()),  # the added instance's id in the tool (its box region)
        pa.field("category", pa.string()),
        pa.field("keypoint_schema", pa.string()),
        pa.field("bbox", pa.list_(pa.float32(), 4)),  # COCO xywh in image pixels
        pa.field("keypoint_x", pa.list_(pa.float32())),  # NaN where not labelled
        pa.field("keypoint_y", pa.list_(pa.float32())),
        pa.field("keypoint_visibility", pa.list_(pa.int8())),  # COCO v: 2 labelled, 0 not
        pa.field("deleted", pa.bool_()),  # the reviewer removed the instance (not a person, a duplicate, ...)
        pa.field("reviewer", pa.string()),
        pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),
        pa.field("tool", pa.string()),  # label-studio
        pa.field("task_id", pa.string()),
        pa.field("annotation_id", pa.string()),
        pa.field("job_id", pa.string()),  # the run that wrote the corrected rows: a rewritten image's no longer match
    ]
)

# What a failure that stands for its whole image leaves empty: nothing is known of its boxes.
IMAGE_FAILURE_NULLS = (
    "image_width", "image_height", "instance_index", "annotation_id", "category", "bbox", "box_score",
    "expert", "center", "scale", "crop",
)


def fail_rows(rows: pa.Table, failing, stage, reason, *, whole_image: bool = False) -> pa.Table:
    """`rows` with `error_stage`/`error_reason` set where `failing` (a bool mask) is true.

    `stage` and `reason` are one value or one per row. `whole_image`: each failing row stands
    for its image (one error row per image): its box fields are nulled and `image_rows` is 1.
    """
    failing = np.asarray(failing, dtype=bool)
    n = rows.num_rows
    columns = {}
    for name, given in (("error_stage", stage), ("error_reason", reason)):
        values = np.array(rows.column(name).to_pylist(), dtype=object)
        values[failing] = np.asarray(given, dtype=object)[failing] if isinstance(given, (list, tuple, np.ndarray)) else given
        columns[name] = pa.array(values.tolist(), pa.string())
    if whole_image:
        mask = pa.array(failing)
        for name in IMAGE_FAILURE_NULLS:
            if name in rows.column_names:
                column = rows.column(name)
                columns[name] = pc.if_else(mask, pa.nulls(n, column.type), column)
        if "image_rows" in rows.column_names:
            columns["image_rows"] = pc.if_else(mask, pa.scalar(1, pa.int32()), rows.column("image_rows"))
    for name, column in columns.items():
        rows = rows.set_column(rows.schema.get_field_index(name), rows.schema.field(name), column)
    return rows
