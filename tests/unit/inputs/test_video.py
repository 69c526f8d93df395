"""Videos without Ray: frames indexed from packets, sampled, cut into ranges, decoded a range at a time; failures as rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raypose.config.spec import VideoSpec
from raypose.errors import ImageError
from raypose.inputs.video import (
    VideoIndex,
    decode_frames,
    index_video,
    index_videos,
    sampled_frames,
)
from raypose.testing.synthetic import make_video

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    make_video(path, frames=20, size=(64, 48))
    return path


def decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_the_index_is_every_shown_frame_in_order(clip):
    index = index_video(str(clip), {}, max_seconds=100)
    assert len(index.pts) == 20 and (np.diff(index.pts) > 0).all() and index.keyframes[0]
    np.testing.assert_allclose(index.times, np.arange(20) / 10)
    assert index.fps == 10.0


def test_sampling_every_nth_by_rate_between_times_and_capped():
    index = VideoIndex(pts=np.arange(30), times=np.arange(30) / 10, keyframes=np.zeros(30, bool), fps=10)
    assert sampled_frames(index, VideoSpec()).tolist() == list(range(30))
    assert sampled_frames(index, VideoSpec(every=4, start=0.5, end=2.0)).tolist() == [5, 9, 13, 17]
    assert sampled_frames(index, VideoSpec(fps=2.5)).tolist() == [0, 4, 8, 12, 16, 20, 24, 28]
    assert sampled_frames(index, VideoSpec(every=3, max_frames=4)).tolist() == [0, 3, 6, 9]
    variable = VideoIndex(pts=np.arange(6), times=np.array([0, 0.1, 0.45, 0.5, 1.2, 1.25]),
                          keyframes=np.zeros(6, bool), fps=5)
    assert sampled_frames(variable, VideoSpec(fps=2)).tolist() == [0, 3, 4]  # the first frame in each half second


def test_a_range_decodes_exactly_its_frames_from_a_seek(clip):
    index = index_video(str(clip), {}, max_seconds=100)
    frames = decoded(clip)
    wanted = [int(index.pts[i]) for i in (11, 12, 17)]
    got = list(decode_frames(str(clip), {}, wanted))
    assert [pts for pts, _ in got] == wanted
    for (_, pixels), i in zip(got, (11, 12, 17)):
        np.testing.assert_array_equal(pixels, frames[i])


def test_a_damaged_packet_costs_its_frame_and_no_other(clip, tmp_path):
    with av.open(str(clip)) as container:
        packets = [(p.pts, p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(clip.read_bytes())
    _, pos, size = packets[12]  # a frame midway, in decode order
    data[pos:pos + size] = b"\xff" * size
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    index = index_video(str(damaged), {}, max_seconds=100)
    assert len(index.pts) == 20  # the index reads packets, not pixels
    got = list(decode_frames(str(damaged), {}, index.pts.tolist()))
    failed = [i for i, (_, pixels) in enumerate(got) if isinstance(pixels, ImageError)]
    assert len(got) == 20 and 1 <= len(failed) <= 2 and failed[0] >= 5
    assert all(got[i][1].shape == (48, 64, 3) for i in range(20) if i not in failed)  # before and after: labelled
    assert got[failed[0]][1].stage == "decode"


def test_videos_that_cannot_be_labelled_are_one_error_task_each(clip, tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with av.open(str(tmp_path / "sound.mp4"), "w") as container:  # an audio stream and no video
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    videos = pa.table({"image_key": ["clip.mp4", "gone.mp4", "noise.mp4", "sound.mp4"],
                       "image_uri": [clip.as_uri(), (tmp_path / "gone.mp4").as_uri(), (tmp_path / "noise.mp4").as_uri(),
                                     (tmp_path / "sound.mp4").as_uri()]})
    frames, failed, counts = index_videos(videos, {}, VideoSpec(every=5, max_seconds=100))
    assert frames.column("image_key").to_pylist() == [f"clip.mp4#{i:06d}" for i in (0, 5, 10, 15)]
    assert frames.column("frame_index").to_pylist() == [0, 5, 10, 15] and counts == {"clip.mp4": 20}
    reasons = {row["image_key"]: (row["error_stage"], row["error_reason"]) for row in failed.to_pylist()}
    assert reasons["gone.mp4"] == ("read", "not found in storage")
    assert reasons["noise.mp4"][0] == "decode" and reasons["noise.mp4"][1].startswith("cannot read the video")
    assert reasons["sound.mp4"] == ("decode", "no video stream in the file")
    _, long, _ = index_videos(videos.slice(0, 1), {}, VideoSpec(max_seconds=1.5))
    assert long.column("error_reason").to_pylist() == ["video is 2 s long, more than images.video.max_seconds (1.5)"]
