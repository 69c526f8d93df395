"""`raypose render` of a video output: frames decoded from their videos, and a short annotated clip per video.

A frame row (`frame_index` set) names its video (`image_uri`) and its place in it: the frame is
found through the video's index (`inputs/video.py`, packets only) and decoded from the keyframe
before it, as the job decoded it. Each video's clip draws its first `max_frames` labelled frames
with their skeletons (`drawing.draw_instances`), every track in one colour throughout (its
`track_id`; an instance without a track keeps its frame's colour), and is written as H.264 in MP4
(FFmpeg's MPEG-4 Part 2 where its build has no libx264) under `videos/`, listed in `videos.html`.
"""

from __future__ import annotations

import html
import io
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
from PIL import Image

from raypose.errors import ImageError
from raypose.inputs.video import decode_frames
from raypose.review.frames import FrameSource

CLIP_COLUMNS = ["image_key", "image_uri", "instance_index", "frame_index", "frame_time", "video_fps", "track_id", "bbox",
                "keypoint_schema", "keypoint_x", "keypoint_y", "keypoint_score", "instance_score"]
CLIP_WIDTH = 960  # clips are scaled down to at most this width: small files, quick to encode


@dataclass
class Clip:
    video: str  # the video's URI
    file: str | None  # relative to --out
    frames: int
    tracks: int
    problem: str | None = None


def render_video_clips(output: str, out: str, *, keypoint_threshold: float = 0.3,
                       storage_options: dict[str, Any] | None = None, max_frames: int = 150) -> list[Clip]:
    """A clip per video of a job's output (its first `max_frames` labelled frames) and `videos.html` in `out`;
    [] for an output of images."""
    from raypose.review.drawing import draw_instances, instance_colours
    from raypose.review.reading import JobOutput, open_fs
    from raypose.review.render import safe_name

    job = JobOutput.open(output, storage_options)
    dataset = job.dataset()
    if dataset is None or "frame_index" not in dataset.schema.names:
        return []
    storage_options, schemas, threshold = storage_options or {}, job.schemas, keypoint_threshold
    out_fs, out_root = open_fs(out, storage_options, "--out")
    table = dataset.to_table(columns=CLIP_COLUMNS, filter=ds.field("frame_index").is_valid())
    if not table.num_rows:
        return []
    out_fs.makedirs(posixpath.join(out_root, "videos"), exist_ok=True)
    source = FrameSource(storage_options)
    clips = []
    for uri in sorted(set(table.column("image_uri").to_pylist())):
        rows = table.filter(pc.equal(table.column("image_uri"), uri)).sort_by(
            [("frame_index", "ascending"), ("instance_index", "ascending")]).to_pylist()
        frames = sorted({r["frame_index"] for r in rows})[:max_frames]
        by_frame: dict[int, list[dict]] = {}
        for row in rows:
            by_frame.setdefault(row["frame_index"], []).append(row)
        tracks = sorted({r["track_id"] for r in rows if r["track_id"] is not None})
        palette = dict(zip(tracks, instance_colours(len(tracks))))
        name = f"videos/{safe_name(rows[0]['image_key'].rsplit('#', 1)[0])}.mp4"
        clip = Clip(video=uri, file=None, frames=len(frames), tracks=len(tracks))
        try:
            pictures = []
            for frame, (_, pixels) in zip(frames, decode_frames(uri, storage_options, source.pts(uri, frames))):
                if isinstance(pixels, ImageError):
                    continue
                image = Image.fromarray(pixels)
                drawn = by_frame[frame]
                colours = [palette.get(r["track_id"], c) for r, c in zip(drawn, instance_colours(len(drawn)))]
                draw_instances(image, drawn, schemas, threshold, colours)
                pictures.append(image)
            fps = rows[0]["video_fps"] or 10.0
            if len(frames) > 1:  # the clip plays at the sampled frames' own pace
                fps = (len(frames) - 1) / max(by_frame[frames[-1]][0]["frame_time"] - by_frame[frames[0]][0]["frame_time"], 1e-3)
            with out_fs.open(posixpath.join(out_root, name), "wb") as f:
                f.write(encode_clip(pictures, fps))
            clip.file = name
        except ImageError as exc:
            clip.problem = f"{exc.stage}: {exc}"
        clips.append(clip)
    _write_page(clips, out_fs, out_root)
    return clips


def encode_clip(pictures: list[Image.Image], fps: float) -> bytes:
    """Pictures as an MP4 (H.264, or FFmpeg's MPEG-4 Part 2 where libx264 is missing), at most CLIP_WIDTH wide."""
    import av

    if not pictures:
        raise ImageError("no frame of the video could be decoded", stage="decode")
    width, height = pictures[0].size
    if width > CLIP_WIDTH:
        width, height = CLIP_WIDTH, round(height * CLIP_WIDTH / width)
    width, height = width - width % 2, height - height % 2  # 4:2:0 wants even sizes
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "23"}
        for picture in pictures:
            frame = np.asarray(picture.convert("RGB").resize((width, height)))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _write_page(clips: list[Clip], out_fs, out_root: str) -> None:
    """videos.html: each clip, playable, with its video and counts."""
    items = []
    for clip in clips:
        title = html.escape(clip.video)
        if clip.file:
            items.append(f'<figure><video src="{html.escape(clip.file)}" controls loop muted width="640"></video>'
                         f"<figcaption>{title}: {clip.frames} frames, {clip.tracks} tracks</figcaption></figure>")
        else:
            items.append(f"<p>{title}: not drawn ({html.escape(clip.problem or '')})</p>")
    page = ("<!doctype html><meta charset=utf-8><title>raypose: videos</title>"
            "<h1>Videos</h1><p><a href=\"index.html\">frames, worst first</a></p>" + "\n".join(items))
    with out_fs.open(posixpath.join(out_root, "videos.html"), "wb") as f:
        f.write(page.encode())
