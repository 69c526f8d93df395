"""Video files (images.format: video): each indexed without decoding, its frames sampled, decoded a range at a time.

The plan indexes every video (PyAV demuxes its packets; no pixel is decoded): a frame is a packet
of the first video stream, in presentation order, so `frame_index` counts the frames a decoder
shows and `frame_time` comes from each frame's own timestamp (variable frame rates included). The
sampled frames become image tasks keyed `VIDEO#NNNNNN`, cut into ranges of about
`images.video.frames_per_task`, each starting at a keyframe where one is near; a read task
(`pipeline/video_stage.py`) seeks to the keyframe before its range and decodes forward. A video
that cannot be indexed (unreadable, no video stream, longer than `max_seconds`) is one error row.
"""

from __future__ import annotations

import bisect
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypose.config.spec import ImagesSpec, VideoSpec
from raypose.errors import ImageError
from raypose.inputs.boxes import BoxSet, attach_boxes
from raypose.inputs.storage import with_retries
from raypose.schema import IMAGE_TASK_SCHEMA

log = logging.getLogger(__name__)

# The columns the plan adds to each frame's image task (schema.IMAGE_TASK_SCHEMA).
FRAME_COLUMNS = ("frame_index", "frame_pts", "frame_time", "video_fps", "video_range")
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


def frame_ranges(chosen: np.ndarray, keyframes: np.ndarray, per_task: int) -> np.ndarray:
    """Each chosen frame's range (0, 1, ...): a range ends after `per_task` frames once the next one can start at
    a keyframe (so no frame is decoded twice), and after `4 * per_task` whatever the keyframes."""
    ranges = np.zeros(len(chosen), np.int32)
    key_positions = np.flatnonzero(keyframes)
    current, count = 0, 0
    for i, frame in enumerate(chosen):
        if count >= per_task and i:
            # A keyframe after the previous chosen frame and at or before this one: decoding starts afresh there.
            k = bisect.bisect_right(key_positions, frame) - 1
            if (k >= 0 and key_positions[k] > chosen[i - 1]) or count >= 4 * per_task:
                current, count = current + 1, 0
        ranges[i] = current
        count += 1
    return ranges


def frame_key(video_key: str, frame: int) -> str:
    """A frame's image key: the video's key and its frame index."""
    return f"{video_key}#{frame:06d}"


def index_videos(videos: pa.Table, storage_options: dict[str, Any],
                 video: VideoSpec) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Listed videos (image_key, image_uri) -> their sampled frames as a listing (image_key, image_uri and
    `FRAME_COLUMNS`), the videos that cannot be read (each one image task with its error), and each
    indexed video's frame count."""
    keys, uris = videos.column("image_key").to_pylist(), videos.column("image_uri").to_pylist()

    def index(uri: str) -> VideoIndex | ImageError:
        try:
            return index_video(uri, storage_options, video.max_seconds)
        except ImageError as exc:
            return exc

    with ThreadPoolExecutor(INDEX_THREADS, thread_name_prefix="raypose-video-index") as pool:
        indexes = list(pool.map(index, uris))
    frames: dict[str, list] = {name: [] for name in ("image_key", "image_uri", *FRAME_COLUMNS)}
    failed, frame_counts = [], {}
    for key, uri, found in zip(keys, uris, indexes):
        if isinstance(found, ImageError):
            failed.append({"image_key": key, "image_uri": uri, "box_xywh": [], "error_stage": found.stage,
                           "error_reason": str(found)})
            continue
        chosen = sampled_frames(found, video)
        frame_counts[key] = len(found.pts)
        frames["image_key"] += [frame_key(key, int(i)) for i in chosen]
        frames["image_uri"] += [uri] * len(chosen)
        frames["frame_index"] += chosen.tolist()
        frames["frame_pts"] += found.pts[chosen].tolist()
        frames["frame_time"] += found.times[chosen].tolist()
        frames["video_fps"] += [found.fps] * len(chosen)
        frames["video_range"] += frame_ranges(chosen, found.keyframes, video.frames_per_task).tolist()
    types = {"image_key": pa.string(), "image_uri": pa.string(), "frame_index": pa.int64(), "frame_pts": pa.int64(),
             "frame_time": pa.float64(), "video_fps": pa.float64(), "video_range": pa.int32()}
    listing = pa.table({name: pa.array(values, types[name]) for name, values in frames.items()})
    return listing.sort_by("image_key"), pa.Table.from_pylist(failed, schema=IMAGE_TASK_SCHEMA), frame_counts


def with_frames(tasks: pa.Table, frames: pa.Table) -> pa.Table:
    """Image tasks of frames (from `attach_boxes`, which keeps only the listing's key columns) with their `FRAME_COLUMNS`."""
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


def video_tasks(videos: pa.Table, images: ImagesSpec, box_set: BoxSet, detecting: bool) -> tuple[pa.Table, pa.Table, dict]:
    """`boxes.attach_boxes` for videos: the listed videos' sampled frames joined with their boxes (a box table
    keyed by frame, or the detector's), plus an error task for each video that cannot be read."""
    frames, failed, frame_counts = index_videos(videos, dict(images.storage_options), images.video)
    tasks, missing, counts = attach_boxes(frames.select(["image_key", "image_uri"]), box_set, detect_missing=detecting)
    tasks = with_frames(tasks, frames)
    # Boxes of frames the sampling leaves out are not missing images: they are left out with their frames.
    unsampled = pa.array([_is_frame_of(key, frame_counts) for key in missing.column("image_key").to_pylist()], pa.bool_())
    if pc.any(unsampled).as_py():
        left_out = pc.is_in(box_set.table.column("image_key"), value_set=missing.column("image_key").filter(unsampled))
        boxes_left_out = int(pc.sum(pc.list_value_length(box_set.table.column("bbox").filter(left_out))).as_py() or 0)
        counts.update(boxes_without_image=counts["boxes_without_image"] - boxes_left_out,
                      boxes_of_frames_not_sampled=boxes_left_out)
        missing = missing.filter(pc.invert(unsampled))
    if failed.num_rows:
        tasks = pa.concat_tables([tasks, failed.cast(tasks.schema)]).sort_by("image_key")
    counts.update(videos=videos.num_rows, videos_failed=failed.num_rows, images=tasks.num_rows)
    return tasks, missing, counts
