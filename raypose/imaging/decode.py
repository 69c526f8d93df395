"""Image bytes -> RGB pixels as the reference sees them: EXIF orientation, mode -> RGB, size limits."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from raypose.errors import ImageError

_ORIENTATION = 0x0112  # EXIF Orientation tag


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes to an RGB image, EXIF orientation applied.

    Animated images give their first frame; 16-bit images are scaled to 8 bits;
    transparent pixels are composited on white, as transformers' `convert_to_rgb` does.
    """
    return decode_image_reduced(data, max_pixels)[0]


def decode_image_reduced(data: bytes | memoryview, max_pixels: int, reduction: int = 1) -> tuple[Image.Image, int, tuple[int, int]]:
    """`decode_image`, a JPEG decoded at 1/2, 1/4 or 1/8 of its size when `reduction` asks (Pillow's draft mode).

    libjpeg then decodes straight to the smaller size (a DCT-domain downscale, so each pixel
    is roughly the mean of a factor x factor block) and skips the full-size image. Only JPEGs
    without an EXIF rotation are reduced. Returns the RGB image, the factor it was reduced by
    (1 when not), and the full size (after EXIF orientation).
    """
    with _image_errors():
        image = _open_image(data, max_pixels)
        width, height = image.size
        factor = 1
        if reduction > 1 and image.format == "JPEG" and image.getexif().get(_ORIENTATION, 1) == 1:
            drafted = image.draft("RGB", (max(1, width // reduction), max(1, height // reduction)))
            if drafted is not None:
                factor = max(1, round(width / drafted[1][2]))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        full_size = image.size if factor == 1 else (width, height)
        return _to_rgb(image), factor, full_size


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, before any pixel is decoded."""

    size: tuple[int, int]  # (width, height) after EXIF orientation
    plain_jpeg: bool  # a JPEG (RGB or grey, no EXIF rotation) a GPU JPEG decoder takes as it is
    region_decodable: bool  # a JPEG kind `jpeg_region` decodes bit-identically to Pillow


def probe_image(data: bytes | memoryview, max_pixels: int) -> ImageHeader:
    """An image's header: fails as `decode_image` does on what the header already shows; no pixel is read."""
    with _image_errors():
        image = _open_image(data, max_pixels)
        orientation = image.getexif().get(_ORIENTATION, 1)
        width, height = image.size
        plain_jpeg = image.format == "JPEG" and orientation == 1 and image.mode in ("RGB", "L")
        # Proven identical in tests/unit/imaging/test_jpeg_region.py: YCbCr at 4:4:4, 4:2:2 or
        # 4:2:0 (baseline, progressive, restart markers, ICC profile) and grey. Adobe-marked
        # files (CMYK, RGB without the colour transform) and other subsamplings stay with Pillow.
        region_decodable = plain_jpeg and "adobe" not in image.info and (
            image.mode == "L" or JpegImagePlugin.get_sampling(image) in (0, 1, 2))
        size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        return ImageHeader(size, plain_jpeg, region_decodable)


def _open_image(data: bytes | memoryview, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes)")
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} = {width * height / 1e6:.3g} Mpx is above images.max_pixels "
            f"({max_pixels:,} pixels): refused as a possible decompression bomb"
        )
    return image


@contextlib.contextmanager
def _image_errors():
    """Any failure to open or decode an image -> ImageError with a reason for the errors table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(f"refused as a decompression bomb: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageError("not an image Pillow can decode (unknown format)") from exc
        except Exception as exc:  # hostile bytes can trip any decoder error; none may stop the job
            raise ImageError(f"corrupt or truncated image data: {type(exc).__name__}: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's own convert("RGB") clips wide values at 255 instead of scaling them.
        wide = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            wide = wide / 257.0
        return Image.fromarray(np.clip(wide + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    # As transformers' convert_to_rgb: an alpha band, or a tRNS colour key (P, but also L and RGB PNGs).
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")  # an RGB image needs no copy
