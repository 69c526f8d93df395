"""A video output's frames, decoded again for review: found by their index through the video's packets, as the job found them."""

from __future__ import annotations

import threading
from typing import Any

from PIL import Image

from raypose.errors import ImageError
from raypose.inputs.video import decode_frames, index_video

MAX_SECONDS = 10 ** 7  # any video: the index of a video the job read is not refused again


class FrameSource:
    """Frames of videos, by their index, decoded as the job decoded them (each video indexed once)."""

    def __init__(self, storage_options: dict[str, Any]):
        self.storage_options = storage_options
        self.indexes: dict[str, Any] = {}
        self._indexing = threading.Lock()  # render draws frames from several threads

    def pts(self, uri: str, frames: list[int]) -> list[int]:
        with self._indexing:
            if uri not in self.indexes:
                self.indexes[uri] = index_video(uri, self.storage_options, MAX_SECONDS)
            index = self.indexes[uri]
        if max(frames) >= len(index.pts):
            raise ImageError(f"the video has {len(index.pts)} frames now, not frame {max(frames)}", stage="read")
        return [int(index.pts[f]) for f in frames]

    def frame(self, uri: str, frame: int) -> Image.Image:
        """One frame, upright, as a PIL image; ImageError if it cannot be decoded."""
        [(_, pixels)] = decode_frames(uri, self.storage_options, self.pts(uri, [frame]))
        if isinstance(pixels, ImageError):
            raise pixels
        return Image.fromarray(pixels)
