"""End to end: videos labelled as images (images.format: video) give the rows their frames give as PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import job_dict, read_json
from PIL import Image
from typer.testing import CliRunner

from raypose.cli import app
from raypose.testing.synthetic import make_video

av = pytest.importorskip("av")
runner = CliRunner()

# H.264 and VP9, constant and variable frame rate, and one turned by its display matrix.
VIDEOS = {
    "walk.mp4": {},
    "walk.webm": {"codec": "libvpx-vp9"},
    "vfr.mp4": {"variable": True},
    "turned.mp4": {"rotation": 90},
}
SAMPLING = {"every": 2, "start": 0.1, "frames_per_task": 2}  # frames 1, 3, 5, ... ; ranges of two, so several seeks
KEYPOINT_COLUMNS = ["keypoint_x", "keypoint_y", "keypoint_score", "instance_score", "bbox", "image_width",
                    "image_height", "annotation_id", "instance_index", "expert"]


def submit(job: Path):
    return runner.invoke(app, ["submit", str(job)], catch_exceptions=False)


def write_boxes(path: Path, boxes: dict[str, list], keep=None, suffix: str = "") -> Path:
    """A box table (JSON lines) of the frames in `keep` (all), keyed by frame key + `suffix`, with annotation ids
    that say which box of which frame each is."""
    lines = [{"image_key": key + suffix, "bbox": box, "annotation_id": 1000 * n + i}
             for n, (key, frame_boxes) in enumerate(sorted(boxes.items())) if keep is None or key in keep
             for i, box in enumerate(frame_boxes)]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """The videos, each frame's boxes by frame key, and every frame as PyAV decodes it (turned upright) in a PNG."""
    folder = tmp_path_factory.mktemp("videos")
    (folder / "videos").mkdir()
    (folder / "frames").mkdir()
    boxes = {}
    for name, options in VIDEOS.items():
        drawn = make_video(folder / "videos" / name, frames=9, **options)
        with av.open(str(folder / "videos" / name)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                key = f"{name}#{index:06d}"
                pixels = np.rot90(frame.to_ndarray(format="rgb24"), round(frame.rotation / 90))
                Image.fromarray(np.ascontiguousarray(pixels)).save(folder / "frames" / f"{key}.png")
                boxes[key] = drawn[index]
    return folder, boxes


def test_video_frames_give_the_rows_their_pngs_give(ray_session, tiny_checkpoint, videos, write_job, tmp_path):
    folder, boxes = videos
    sampled = {key: b for key, b in boxes.items() if int(key[-6:]) % 2 == 1}  # every 2nd frame from 0.1 s
    # batch_size 1: each crop its own forward, so the two jobs' different batches cannot round differently.
    pose = {"batch_size": 1}
    video_job = job_dict(folder / "videos", write_boxes(tmp_path / "video_boxes.jsonl", boxes), tiny_checkpoint,
                         tmp_path / "video_out", pose=pose)
    video_job["images"].update(format="video", video=SAMPLING)
    video_job["pose"]["track"] = True
    video_job["boxes"]["source"] = "table"
    image_job = job_dict(folder / "frames", write_boxes(tmp_path / "png_boxes.jsonl", boxes, sampled, ".png"),
                         tiny_checkpoint, tmp_path / "png_out", pose=pose)
    image_job["boxes"]["source"] = "table"
    for spec, name in ((video_job, "video.yaml"), (image_job, "png.yaml")):
        result = submit(write_job(spec, name))
        assert result.exit_code == 0, result.output
    by_video = pq.read_table(tmp_path / "video_out" / "keypoints").sort_by([("image_key", "ascending"),
                                                                            ("instance_index", "ascending")])
    by_png = pq.read_table(tmp_path / "png_out" / "keypoints").sort_by([("image_key", "ascending"),
                                                                        ("instance_index", "ascending")])
    assert by_video.num_rows == sum(len(b) for b in sampled.values()) == by_png.num_rows
    assert by_video.column("image_key").to_pylist() == [k[: -len(".png")] for k in by_png.column("image_key").to_pylist()]
    for name in KEYPOINT_COLUMNS:
        assert by_video.column(name).equals(by_png.column(name)), name
    # The frame's place in its video: its index, its time from its own timestamp, the video's rate.
    rows = by_video.to_pylist()
    assert {r["image_key"].split("#")[0] for r in rows} == set(VIDEOS)
    for row in rows:
        assert row["frame_index"] == int(row["image_key"][-6:])
        assert row["image_uri"].endswith(row["image_key"].split("#")[0])
    vfr = [r for r in rows if r["image_key"].startswith("vfr.mp4") and r["instance_index"] == 0]
    # 0.1, 0.2 and 0.3 s apart in turn: frames 1, 3, 5, 7 at 0.1, 0.6, 0.9, 1.3 s.
    np.testing.assert_allclose([r["frame_time"] for r in vfr], [0.1, 0.6, 0.9, 1.3], atol=1e-6)
    turned = [r for r in rows if r["image_key"].startswith("turned.mp4")]
    assert {(r["image_width"], r["image_height"]) for r in turned} == {(128, 96)}  # upright, as drawn
    assert {r["video_fps"] for r in rows if r["image_key"].startswith("walk")} == {10.0}
    # Tracks: each drawn walker (the box's place in its frame's list) keeps one id through its video.
    for video in VIDEOS:
        ids = {}
        for row in rows:
            if row["image_key"].startswith(video + "#"):
                ids.setdefault(row["annotation_id"] % 1000, set()).add(row["track_id"])
        assert sorted(len(v) for v in ids.values()) == [1, 1] and set.union(*ids.values()) == {0, 1}, (video, ids)
    assert by_png.column("track_id").null_count == by_png.num_rows  # no tracks without pose.track
    manifest = read_json(tmp_path / "video_out" / "manifest.json")
    assert manifest["counts"]["images"] == len(sampled) and manifest["counts"]["errors"] == 0
    assert pc.all(by_png.column("frame_index").is_null()).as_py()  # images have no frame

    # Review: the worst frames drawn on the frames decoded from their videos, and a clip per video.
    result = runner.invoke(app, ["render", str(tmp_path / "video_out"), "--out", str(tmp_path / "review"), "--sample", "3"])
    assert result.exit_code == 0, result.output
    assert "rendered: 3 of 3 chosen images" in result.output and "rendered: 4 of 4 videos as clips" in result.output
    assert len(list((tmp_path / "review" / "images").glob("*.jpg"))) == 3
    clips = sorted((tmp_path / "review" / "videos").glob("*.mp4"))
    assert len(clips) == 4 and "<video" in (tmp_path / "review" / "videos.html").read_text()
    with av.open(str(clips[0])) as container:
        shown = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(shown) == 4 and shown[0].shape == (96, 128, 3)  # the four sampled frames, upright
