"""Region decode: bit-identical to Pillow's full decode for every JPEG kind that takes it; the rest keep Pillow."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from raypose.imaging.decode import probe_image
from raypose.imaging.jpeg_region import decode_jpeg_region, region_decoder_available

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nvImageCodec has Linux wheels only")


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus grain: every 8x8 block differs, chroma varies across the picture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1)
    return Image.fromarray(np.clip(pixels + rng.integers(-40, 40, pixels.shape), 0, 255).astype(np.uint8))


def encode(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **params)
    return buffer.getvalue()


def pillow(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


KINDS = {
    f"{name}{suffix}": dict(subsampling=code, **extra)
    for code, name in ((0, "4:4:4"), (1, "4:2:2"), (2, "4:2:0"))
    for suffix, extra in (("", {}), (" progressive", {"progressive": True}),
                          (" restart markers", {"restart_marker_blocks": 3}),
                          (" restart rows", {"restart_marker_rows": 1}),
                          (" optimised", {"optimize": True, "quality": 70}),
                          (" icc profile", {"icc_profile": b"\0" * 128}))
}


def test_the_library_is_installed_here():
    assert region_decoder_available()  # a dependency on Linux: without it every test below would prove nothing


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_regions_equal_pillow_full_decode_sliced(kind):
    params = dict(KINDS[kind])
    data = encode(scene(613, 419), quality=params.pop("quality", 90), **params)
    assert probe_image(data, 10**8).region_decodable
    full = pillow(data)
    rng = np.random.default_rng(7)
    regions = [(0, 0, 613, 419), (0, 0, 1, 1), (612, 418, 613, 419), (1, 7, 600, 12), (5, 3, 14, 418)]
    for _ in range(25):
        x0, y0 = int(rng.integers(0, 612)), int(rng.integers(0, 418))
        regions.append((x0, y0, int(rng.integers(x0 + 1, 614)), int(rng.integers(y0 + 1, 420))))
    for x0, y0, x1, y1 in regions:
        np.testing.assert_array_equal(decode_jpeg_region(data, (x0, y0, x1, y1)), full[y0:y1, x0:x1])


@pytest.mark.parametrize("progressive", [False, True])
def test_grey_jpeg_regions_equal_pillow_as_rgb(progressive):
    data = encode(scene(301, 207).convert("L"), quality=90, progressive=progressive)
    assert probe_image(data, 10**8).region_decodable
    full = pillow(data)
    for x0, y0, x1, y1 in ((0, 0, 301, 207), (17, 33, 250, 101), (300, 0, 301, 207)):
        np.testing.assert_array_equal(decode_jpeg_region(data, (x0, y0, x1, y1)), full[y0:y1, x0:x1])


def test_kinds_not_proven_identical_keep_pillow():
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(scene(40, 20), exif=exif.tobytes())
    cmyk = encode(scene(40, 20).convert("CMYK"))
    png = io.BytesIO()
    scene(40, 20).save(png, "PNG")
    for data in (rotated, cmyk, png.getvalue()):
        assert not probe_image(data, 10**8).region_decodable


def test_damaged_files_are_left_to_pillow():
    data = encode(scene(600, 400), quality=90)
    flipped = data[:2000] + bytes(b ^ 0xFF for b in data[2000:2100]) + data[2100:]
    cut_short = data[: int(len(data) * 0.6)]  # rows below the region are gone: the region alone decodes
    for damaged in (flipped, cut_short, data[:-2]):
        assert decode_jpeg_region(damaged, (0, 0, 600, 40)) is None
    assert decode_jpeg_region(data + b"\0" * 10, (0, 0, 600, 40)) is not None  # padding after the end marker


def test_the_library_says_nothing_to_the_user():
    script = (
        "import io, numpy as np; from PIL import Image\n"
        "from raypose.imaging.jpeg_region import decode_jpeg_region\n"
        "noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)\n"
        "b = io.BytesIO(); Image.fromarray(noise).save(b, 'JPEG'); d = b.getvalue(); m = len(d) // 2\n"
        "assert decode_jpeg_region(d, (0, 0, 256, 256)) is not None\n"
        "assert decode_jpeg_region(d[:m] + bytes(x ^ 255 for x in d[m:m + 64]) + d[m + 64:], (0, 0, 256, 256)) is None\n"
        "import sys; print('kept', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "kept\n"
