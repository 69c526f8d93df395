"""A JPEG's region decoded alone on the CPU (nvImageCodec's libjpeg-turbo), bit-identical to Pillow's
full decode cut to the same rectangle.

libjpeg-turbo then skips the rows below the region, reconstructs none of the rows above it
(they are only entropy-decoded) and none of the columns beside it (benchmarks/README.md has
the measured costs). Only the JPEG kinds
the tests prove identical come here (`decode.ImageHeader.region_decodable`), and any decode
the library has a word to say about (libjpeg's warnings about corrupt data, a failure) is
answered None, as is a file that does not end with the JPEG end marker (cut short: rows below
the region are never read, so the region decode alone would not notice). The caller then
decodes with Pillow, which gives the reference's pixels or the reference's error.

The library is optional (`nvidia-nvimgcodec-cu12`, Linux wheels); without it every image takes
the Pillow path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading

import numpy as np

# The library reports through the process's stderr (fd 2), not per call; one decode at a time
# per process lets its words be read back and charged to that decode.
_DECODE_LOCK = threading.Lock()


@contextlib.contextmanager
def library_output():
    """One nvImageCodec call at a time in this process, what it writes to stderr held back: yields a
    function returning those words."""
    with _DECODE_LOCK, _captured_stderr() as said:
        yield said


def nvimgcodec_decoder(device_id: int, backends: tuple[str, ...], options: str = ""):
    """(module, Decoder) for nvImageCodec's `backends` (BackendKind names) on `device_id`; None when
    the library is not installed. Made once per process and arguments."""
    return _made_decoder(device_id, tuple(backends), options)


@functools.cache
def _made_decoder(device_id: int, backends: tuple[str, ...], options: str):
    try:
        with library_output():  # it says, on import, which GPU codec libraries it did not find
            from nvidia import nvimgcodec

            decoder = nvimgcodec.Decoder(
                device_id=device_id, options=options,
                backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind)) for kind in backends])
    except ImportError:
        return None
    return nvimgcodec, decoder


def _decoder():
    """The CPU-only decoder; None when nvImageCodec is not installed."""
    return nvimgcodec_decoder(CPU_ONLY, ("CPU_ONLY",))


CPU_ONLY = -99999  # nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, known before the library is imported


def region_decoder_available() -> bool:
    """Whether JPEG regions can be decoded here (nvImageCodec is installed)."""
    return _decoder() is not None


def decode_jpeg_region(data: bytes | memoryview, region: tuple[int, int, int, int]) -> np.ndarray | None:
    """The pixels of `region` (x0, y0, x1, y1) of a JPEG as (y1 - y0, x1 - x0, 3) uint8 RGB, or None
    when they cannot be vouched for (no library, a failed decode, any message from the decoder)."""
    loaded = _decoder()
    if loaded is None or not ends_with_end_marker(data):
        return None
    nvimgcodec, decoder = loaded
    x0, y0, x1, y1 = region
    with library_output() as said:
        try:
            stream = nvimgcodec.CodeStream(bytes(data)).get_sub_code_stream(region=nvimgcodec.Region(y0, x0, y1, x1))
            decoded = decoder.decode(stream)
            pixels = None if decoded is None else np.asarray(decoded.cpu())
        except Exception:  # the library's own exceptions: Pillow decides what the image is
            pixels = None
    if said() or pixels is None or pixels.shape != (y1 - y0, x1 - x0, 3) or pixels.dtype != np.uint8:
        return None
    return pixels


def ends_with_end_marker(data: bytes | memoryview) -> bool:
    """Whether a file ends as a whole JPEG does (a decoder of regions or on a GPU may not notice one cut short)."""
    return bytes(data[-64:]).rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"


@contextlib.contextmanager
def _captured_stderr():
    """Route fd 2 into a temporary file for the block; yields a function returning the library's lines.

    Other lines (another thread's log line written meanwhile) go back to stderr.
    """
    captured: list[bytes] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: b"".join(captured)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read()
            lines = text.splitlines(keepends=True)
            captured.extend(line for line in lines if _is_library_line(line))
            others = [line for line in lines if not _is_library_line(line)]
            if others:
                os.write(2, b"".join(others))


# What nvImageCodec and its libjpeg-turbo write (load failures of the GPU codecs, libjpeg's warnings).
_LIBRARY_WORDS = (b"nvjpeg", b"nvtiff", b"jpeg", b"JPEG", b"nvimgcodec", b"nvImageCodec", b"marker", b"[ERROR]",
                  b"[WARNING]", b"Premature", b"Corrupt")


def _is_library_line(line: bytes) -> bool:
    return any(word in line for word in _LIBRARY_WORDS)
