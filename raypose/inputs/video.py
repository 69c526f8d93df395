"""Video files (images.format: video): each indexed without decoding, its frames sampled, decoded a block at a time.

The listing indexes every video (PyAV demuxes its packets; no pixel is decoded): a frame is a
packet of the first video stream, in presentation order, so `frame_index` counts the frames a
decoder shows and `frame_time` comes from each frame's own timestamp (variable frame rates
included). The sampled frames are the job's images, keyed `VIDEO#NNNNNN`; the Dataset takes them
`images.video.frames_per_task` at a time, and a read task (`pipeline/video_stage.py`) seeks to
the keyframe before its first frame and decodes forward. A video that cannot be indexed
(unreadable, no video stream, longer than `max_seconds`) is one error row.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypose.config.spec import ImagesSpec, VideoSpec
from raypose.errors import ImageError
from raypose.inputs.storage import with_retries
from raypose.schema import IMAGE_TASK_SCHEMA

log = logging.getLogger(__name__)

# The columns the plan adds to each frame's image task (schema.IMAGE_TASK_SCHEMA).
FRAME_COLUMNS = ("frame_index", "frame_pts", "frame_time", "video_fps")
FRAME_COUNTS = "raypose_video_frames"  # listing metadata: each indexed video's frame count
INDEX_THREADS = 8  # videos indexed at once by the plan: mostly waiting on storage


def _av():
    try:
        import av
    except ImportError as exc:  # a dependency; this says what to install if an environment lacks it
        raise ImportError("images.format: video needs PyAV: pip install av") from exc
    return av


@dataclass(frozen=True)
class VideoIndex:
    """One video's frames, in presentation order: their timestamps (stream time base), times (s), keyframes."""

    pts: np.ndarray  # int64
    times: np.ndarray  # float64 seconds from the first frame
    keyframes: np.ndarray  # bool
    fps: float


def open_video(uri: str, storage_options: dict[str, Any]):
    """An open PyAV container and its first video stream (the file read through fsspec); ImageError if it has none."""
    import fsspec

    av = _av()
    try:
        file = fsspec.open(uri, "rb", **with_retries(uri, storage_options)).open()
    except FileNotFoundError as exc:
        raise ImageError("not found in storage", stage="read") from exc
    except Exception as exc:
        raise ImageError(f"cannot read: {type(exc).__name__}: {exc}", stage="read") from exc
    try:
        container = av.open(file, "r")
    except Exception as exc:  # av.error.FFmpegError and the like: not a video FFmpeg can read
        file.close()
        raise ImageError(f"cannot read the video: {type(exc).__name__}: {exc}", stage="decode") from exc
    if not container.streams.video:
        container.close()
        file.close()
        raise ImageError("no video stream in the file", stage="decode")
    return container, container.streams.video[0]


def index_video(uri: str, storage_options: dict[str, Any], max_seconds: float) -> VideoIndex:
    """Every frame of the video's first video stream, from its packets (nothing decoded); ImageError if it cannot."""
    container, stream = open_video(uri, storage_options)
    try:
        packets = []
        try:
            for packet in container.demux(stream):
                # Flush packets are empty; discarded ones (an edit list's lead-in) are never shown.
                if packet.size and packet.pts is not None and not packet.is_discard:
                    packets.append((packet.pts, packet.is_keyframe))
        except Exception as exc:  # a damaged container: the frames read so far are the video's
            log.warning("%s: demuxing stopped after %d frames: %s", uri, len(packets), exc)
        if not packets:
            raise ImageError("the video stream has no frames", stage="decode")
        packets.sort()
        pts = np.array([p for p, _ in packets], np.int64)
        times = (pts - pts[0]) * float(stream.time_base)
        if times[-1] > max_seconds:
            raise ImageError(f"video is {times[-1]:.0f} s long, more than images.video.max_seconds ({max_seconds:g})",
                             stage="decode")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else (len(pts) - 1) / times[-1] if times[-1] > 0 else 0.0
        return VideoIndex(pts=pts, times=times, keyframes=np.array([k for _, k in packets], bool), fps=fps)
    finally:
        container.close()


def sampled_frames(index: VideoIndex, video: VideoSpec) -> np.ndarray:
    """The indexes of the frames to label: inside [start, end), every Nth or about `fps` a second, at most `max_frames`."""
    times = index.times
    inside = np.flatnonzero((times >= video.start) & ((times < video.end) if video.end is not None else True))
    if video.fps is not None:
        # The first frame at or after each tick of 1/fps seconds (a frame standing for several ticks counts once).
        ticks = np.floor((times[inside] - video.start) * video.fps + 1e-9).astype(np.int64)
        chosen = inside[np.concatenate([[True], ticks[1:] != ticks[:-1]])] if inside.size else inside
    else:
        chosen = inside[:: video.every]
    return chosen[: video.max_frames] if video.max_frames is not None else chosen


def frame_key(video_key: str, frame: int) -> str:
    """A frame's image key: the video's key and its frame index."""
    return f"{video_key}#{frame:06d}"


def index_videos(videos: pa.Table, storage_options: dict[str, Any],
                 video: VideoSpec) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Listed videos (image_key, image_uri, ...) -> their sampled frames as a listing (the video's listing
    columns, each frame's key and `FRAME_COLUMNS`), the videos that cannot be read (their listing rows with
    `error_stage` and `error_reason`), and each indexed video's frame count."""
    uris = videos.column("image_uri").to_pylist()

    def index(uri: str) -> VideoIndex | ImageError:
        try:
            return index_video(uri, storage_options, video.max_seconds)
        except ImageError as exc:
            return exc

    with ThreadPoolExecutor(INDEX_THREADS, thread_name_prefix="raypose-video-index") as pool:
        indexes = list(pool.map(index, uris))
    rows, frames = [], {name: [] for name in ("image_key", *FRAME_COLUMNS)}
    failed, stages, reasons, frame_counts = [], [], [], {}
    for row, (key, found) in enumerate(zip(videos.column("image_key").to_pylist(), indexes)):
        if isinstance(found, ImageError):
            failed.append(row)
            stages.append(found.stage)
            reasons.append(str(found))
            continue
        chosen = sampled_frames(found, video)
        frame_counts[key] = len(found.pts)
        rows += [row] * len(chosen)
        frames["image_key"] += [frame_key(key, int(i)) for i in chosen]
        frames["frame_index"] += chosen.tolist()
        frames["frame_pts"] += found.pts[chosen].tolist()
        frames["frame_time"] += found.times[chosen].tolist()
        frames["video_fps"] += [found.fps] * len(chosen)
    listing = videos.take(pa.array(rows, pa.int64()))
    for name, values in frames.items():
        column = pa.array(values, IMAGE_TASK_SCHEMA.field(name).type)
        listing = (listing.set_column(listing.schema.get_field_index(name), name, column) if name in listing.column_names
                   else listing.append_column(name, column))
    unreadable = videos.take(pa.array(failed, pa.int64()))
    unreadable = unreadable.append_column("error_stage", pa.array(stages, pa.string())).append_column(
        "error_reason", pa.array(reasons, pa.string()))
    return listing.sort_by("image_key"), unreadable, frame_counts


def list_frames(videos: pa.Table, images: ImagesSpec) -> pa.Table:
    """The listing of a video job: every sampled frame (the video's listing columns, the frame's key and
    `FRAME_COLUMNS`) and every video that cannot be read (with its error), by key; the frame counts of the
    videos ride in the schema's metadata (`frame_tasks` tells boxes of frames left out by the sampling)."""
    frames, unreadable, counts = index_videos(videos, dict(images.storage_options), images.video)
    listing = pa.concat_tables([frames, unreadable], promote_options="default").sort_by("image_key")
    return listing.replace_schema_metadata({FRAME_COUNTS: json.dumps(counts)})


def frame_tasks(tasks: pa.Table, listed: pa.Table, missing: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A chunk's image tasks as the box join made them from frames (`BoxJoin.chunk`), with their `FRAME_COLUMNS`,
    and an error task for each video of the chunk that cannot be read; and the chunk's errors of boxes whose
    image is not listed less those of frames the sampling left out (they are left out with their frames)."""
    failed = pc.is_valid(listed.column("error_stage")) if "error_stage" in listed.column_names else None
    if failed is not None and pc.any(failed).as_py():
        unreadable = listed.filter(failed)
        tasks = tasks.filter(pc.invert(pc.is_in(tasks.column("image_key"), value_set=unreadable.column("image_key"))))
        errors = pa.table({name: unreadable.column(name) if name in unreadable.column_names else
                           pa.nulls(unreadable.num_rows, field.type) for name, field in zip(tasks.schema.names, tasks.schema)})
        errors = errors.set_column(errors.schema.get_field_index("box_xywh"), "box_xywh",
                                   pa.array([[]] * unreadable.num_rows, tasks.schema.field("box_xywh").type))
        tasks = pa.concat_tables([tasks, errors.cast(tasks.schema)]).sort_by("image_key")
    tasks = with_frames(tasks, listed)  # in key order: the join's tasks are
    counts = json.loads((listed.schema.metadata or {}).get(FRAME_COUNTS.encode(), b"{}"))
    unsampled = pa.array([_is_frame_of(key, counts) for key in missing.column("image_key").to_pylist()], pa.bool_())
    return tasks, missing.filter(pc.invert(unsampled)) if len(unsampled) else missing


def video_counts(listed: pa.Table) -> dict[str, int | None]:
    """The videos a chunk of a video job's listing comes from: each one's frame count, None for one that cannot be read."""
    counts: dict[str, int | None] = json.loads((listed.schema.metadata or {}).get(FRAME_COUNTS.encode(), b"{}"))
    if "error_stage" in listed.column_names:
        failed = listed.filter(pc.is_valid(listed.column("error_stage")))
        counts.update(dict.fromkeys(failed.column("image_key").to_pylist()))
    return counts


def with_frames(tasks: pa.Table, frames: pa.Table) -> pa.Table:
    """Image tasks of frames (the box join keeps only the listing's key columns) with their `FRAME_COLUMNS`."""
    if "frame_index" not in frames.column_names:
        return tasks
    where = pc.index_in(tasks.column("image_key"), value_set=frames.column("image_key"))
    for name in FRAME_COLUMNS:
        index = tasks.schema.get_field_index(name)
        tasks = tasks.set_column(index, tasks.schema.field(name), frames.column(name).take(where).cast(tasks.schema.field(name).type))
    return tasks


def _is_frame_of(key: str, frame_counts: dict[str, int]) -> bool:
    """Whether `key` names a frame (`VIDEO#NNNNNN`) of an indexed video."""
    video, _, number = key.rpartition("#")
    return number.isdigit() and int(number) < frame_counts.get(video, 0)


def decode_frames(uri: str, storage_options: dict[str, Any], wanted: list[int]) -> Iterator[tuple[int, np.ndarray | ImageError]]:
    """The frames with timestamps `wanted` (ascending, one range) as upright RGB arrays, in order: the decode
    starts at the keyframe before the first and goes forward. A frame the decoder never gives (a damaged
    packet) is an ImageError in its place; the frames around it are decoded as usual."""
    container, stream = open_video(uri, storage_options)
    pending = list(wanted)
    try:
        stream.thread_type = "AUTO"
        for frame in _frames_from(container, stream, pending[0]):
            while pending and pending[0] < frame.pts:  # passed without being shown
                yield pending.pop(0), ImageError("the decoder gave no frame at this timestamp (damaged data?)",
                                                 stage="decode")
            if not pending:
                break
            if frame.pts == pending[0]:
                yield pending.pop(0), upright(frame)
    except Exception as exc:  # the container failed past recovery: the rest of the range fails
        reason = f"cannot decode the video: {type(exc).__name__}: {exc}"
        while pending:
            yield pending.pop(0), ImageError(reason, stage="decode")
    finally:
        container.close()
    for pts in pending:  # the stream ended first
        yield pts, ImageError("the video ended before this frame (truncated?)", stage="decode")


def _frames_from(container, stream, target: int):
    """Decoded frames (with timestamps) from the keyframe at or before `target` on; from the stream's start
    when the seek lands past it (a container whose index is imprecise)."""
    container.seek(target, stream=stream, backward=True, any_frame=False)
    frames = _frames(container, stream)
    first = next(frames, None)
    if first is not None and first.pts > target:
        container.seek(min(target, stream.start_time or 0), stream=stream, backward=True, any_frame=False)
        frames = _frames(container, stream)
    elif first is not None:
        yield first
    yield from frames


def _frames(container, stream):
    """Decoded frames of `stream` that have timestamps, from where the container stands; a packet the decoder
    refuses is skipped (its frame is then missing, and reported so)."""
    av = _av()
    for packet in container.demux(stream):
        try:
            decoded = packet.decode()
        except av.error.FFmpegError as exc:
            log.warning("a damaged packet at %s was skipped: %s", packet.pts, exc)
            continue
        yield from (frame for frame in decoded if frame.pts is not None)


def upright(frame) -> np.ndarray:
    """A decoded frame's RGB pixels, turned as its display matrix says (as EXIF orientation is applied to images)."""
    pixels = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4  # counterclockwise quarter turns
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels


def frame_ppm(pixels: np.ndarray) -> np.ndarray:
    """RGB pixels as the bytes (uint8) of a binary PPM: lossless, nothing to compress, read by Pillow like any image."""
    height, width, _ = pixels.shape
    return np.concatenate([np.frombuffer(b"P6 %d %d 255\n" % (width, height), np.uint8), pixels.reshape(-1)])
