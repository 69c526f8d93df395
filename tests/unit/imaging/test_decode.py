"""Decoding hostile images: empty, truncated, bombs, every awkward mode, animation, EXIF rotation, header probes."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raypose.errors import ImageError
from raypose.imaging.decode import ImageHeader, decode_image, probe_image

MAX_PIXELS = 1_000_000


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def save(path: Path, size=(4, 3), color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header claims width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


# --- decode_image: hostile inputs -----------------------------------------------------------


def decode_error(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels)
    return info.value


def test_decode_zero_bytes():
    error = decode_error(b"")
    assert (error.stage, str(error)) == ("decode", "empty file (0 bytes)")


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.98])
def test_decode_truncated_jpeg(keep):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    error = decode_error(data[: int(len(data) * keep)])
    assert error.stage == "decode"
    assert str(error).startswith("corrupt or truncated image data: ")


def test_decode_not_an_image():
    error = decode_error(b"<html>404 not found</html>\n" * 10)
    assert (error.stage, str(error)) == ("decode", "not an image Pillow can decode (unknown format)")


def test_decode_bomb_declared_size_beyond_pillow_limit():
    error = decode_error(png_declaring(100_000, 100_000))
    assert error.stage == "decode"
    assert "decompression bomb" in str(error)


def test_decode_bomb_above_max_pixels():
    error = decode_error(png_declaring(5000, 4000), max_pixels=MAX_PIXELS)
    assert error.stage == "decode"
    assert str(error).startswith("5000x4000 = 20 Mpx is above images.max_pixels")
    assert "decompression bomb" in str(error)


def test_decode_real_image_above_max_pixels():
    data = encode(Image.new("RGB", (20, 10)), "PNG")
    assert "is above images.max_pixels" in str(decode_error(data, max_pixels=199))
    assert decode_image(data, max_pixels=200).size == (20, 10)


def test_decode_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 65535, 32896, 257, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on disk
    image = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.shape == (1, 5, 3)
    assert (pixels == pixels[..., :1]).all()  # gray stays gray
    assert pixels[0, :, 0].tolist() == [0, 255, 128, 1, 4]


def test_decode_palette():
    image = Image.new("P", (3, 2), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    pixels = np.asarray(decode_image(encode(image, "PNG"), MAX_PIXELS))
    assert pixels.shape == (2, 3, 3)
    assert pixels[1, 1].tolist() == [10, 200, 30]
    assert pixels[0, 0].tolist() == [0, 0, 0]


def test_decode_palette_transparency_on_white():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 0), 1)
    pixels = np.asarray(decode_image(encode(image, "PNG", transparency=0), MAX_PIXELS))
    assert pixels[0].tolist() == [[255, 255, 255], [10, 200, 30]]


def test_decode_cmyk_jpeg():
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image)[4, 4].tolist()
    assert red > 240 and green < 15 and blue < 15


def test_decode_grayscale():
    image = decode_image(encode(Image.new("L", (3, 2), 77), "PNG"), MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (3, 2)
    assert (np.asarray(image) == 77).all()


def test_decode_rgba_composited_on_white():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 0, 128)])
    pixels = np.asarray(decode_image(encode(image, "PNG"), MAX_PIXELS))
    assert pixels[0, 0].tolist() == [255, 0, 0]  # opaque: unchanged
    assert pixels[0, 1].tolist() == [255, 255, 255]  # transparent: white, not the hidden red
    assert pixels[0, 2].tolist() == [127, 127, 127]  # half black over white


def test_decode_gray_alpha_composited_on_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 255), (0, 0)])
    pixels = np.asarray(decode_image(encode(image, "PNG"), MAX_PIXELS))
    assert pixels[0].tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize("mode, transparent", [("L", 0), ("RGB", (0, 0, 0))])
def test_decode_colour_key_transparency_on_white(mode, transparent):
    # A tRNS colour key on a grayscale or RGB PNG: transformers' convert_to_rgb makes it white too.
    image = Image.new(mode, (2, 1), transparent)
    image.putpixel((1, 0), 90 if mode == "L" else (90, 90, 90))
    data = encode(image, "PNG", transparency=transparent)
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None
    pixels = np.asarray(decode_image(data, MAX_PIXELS))
    assert pixels[0].tolist() == [[255, 255, 255], [90, 90, 90]]


def test_decode_animated_gif_first_frame():
    frames = [Image.new("RGB", (6, 5), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (6, 5)
    assert (np.asarray(image) == [255, 0, 0]).all()


def test_decode_exif_rotated_jpeg():
    # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 = rotate 90° clockwise.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = 6
    image = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), MAX_PIXELS)
    assert image.size == (20, 40)
    shown = np.asarray(image).astype(int)
    # Clockwise: the stored left (red) half is now on top, the right (blue) half at the bottom.
    assert np.abs(shown[5, 10] - [255, 0, 0]).max() < 8
    assert np.abs(shown[35, 10] - [0, 0, 255]).max() < 8


def test_probe_reads_the_shown_size_from_the_header_and_tells_plain_jpegs():
    rotated = Image.new("RGB", (40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6
    assert probe_image(encode(rotated, "JPEG", exif=exif.tobytes()), MAX_PIXELS) == ImageHeader((20, 40), False, False)
    assert probe_image(encode(Image.new("RGB", (7, 5)), "JPEG"), MAX_PIXELS) == ImageHeader((7, 5), True, True)
    assert probe_image(encode(Image.new("L", (7, 5)), "JPEG"), MAX_PIXELS) == ImageHeader((7, 5), True, True)
    assert probe_image(encode(Image.new("CMYK", (7, 5)), "JPEG"), MAX_PIXELS) == ImageHeader((7, 5), False, False)
    assert probe_image(encode(Image.new("RGB", (7, 5)), "PNG"), MAX_PIXELS) == ImageHeader((7, 5), False, False)
    with pytest.raises(ImageError, match="above images.max_pixels"):
        probe_image(encode(Image.new("RGB", (7, 5)), "JPEG"), 34)
    with pytest.raises(ImageError, match="empty file"):
        probe_image(b"", MAX_PIXELS)


def test_decode_one_pixel():
    image = decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), MAX_PIXELS)
    assert image.size == (1, 1)
    assert np.asarray(image).tolist() == [[[1, 2, 3]]]
