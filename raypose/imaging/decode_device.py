"""A call's images decoded for the pose device, by the decoder the layout chose (named in the result key).

  PillowDecoder        Pillow's pixels, the reference's: a JPEG's region alone on the CPU where that
                       is proven exact (`jpeg_region`), else the whole image; copied to the device
  NvjpegDecoder        torchvision's nvJPEG: whole plain JPEGs in one batched call on the GPU
  NvImageCodecDecoder  nvImageCodec on the GPU: the JPEG engine (HW_GPU_ONLY) for baseline files,
                       hybrid CPU+GPU for progressive ones, CUDA nvJPEG on a GPU without the engine;
                       only the crops' regions, in one batched call, the pixels left on the device

A GPU decoder's pixels differ from Pillow's (its IDCT and chroma upsampling round differently:
benchmarks/README.md). What it does not take (not a plain JPEG, a file cut short, a failure, any
word from the library) is decoded as PillowDecoder does: the reference's pixels or its error.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from raypose.errors import ImageError
from raypose.imaging.decode import decode_image
from raypose.imaging.jpeg_region import (
    CPU_ONLY,
    decode_jpeg_region,
    ends_with_end_marker,
    library_output,
    nvimgcodec_decoder,
)


@dataclass
class EncodedImage:
    """An image whose crops are cut on the pose device: its bytes, and what its header says."""

    data: bytes | memoryview  # the encoded image
    size: tuple[int, int]  # (width, height) after EXIF orientation, from the header
    plain_jpeg: bool  # a GPU JPEG decoder can take it as it is (`decode.probe_image`)
    rows: list[int] = field(default_factory=list)  # its crop rows in the crop stage's table
    region: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) its crops read, when decoded alone is exact

    @property
    def region_size(self) -> tuple[int, int] | None:
        """(width, height) of the region, if any."""
        if self.region is None:
            return None
        x0, y0, x1, y1 = self.region
        return x1 - x0, y1 - y0


@dataclass
class DecodedImage:
    """An image's pixels on the device, (3, h, w) uint8: the whole image, or the region of it from `origin`."""

    pixels: torch.Tensor
    size: tuple[int, int]  # (width, height) of the whole image
    origin: tuple[int, int] = (0, 0)  # where `pixels` start in it


@dataclass(frozen=True)
class PillowDecoder:
    """Pillow's pixels (`decode_on_device` decodes on the CPU whatever a GPU decoder leaves)."""

    name: ClassVar[str] = "pillow"

    def decode_batch(self, images: list[EncodedImage], device: torch.device) -> list[DecodedImage | None]:
        """The plain JPEGs among `images` decoded on `device` (None: left to Pillow); a GPU decoder's hook.

        What it returns for an image is used only if it is the image's pixels, whole or its region.
        """
        return [None] * len(images)

    def missing(self) -> str | None:
        """The package this decoder needs that is not installed here, if any."""
        return None


@dataclass(frozen=True)
class NvjpegDecoder(PillowDecoder):
    """torchvision's batched nvJPEG, whole images."""

    name: ClassVar[str] = "nvjpeg"

    def missing(self) -> str | None:
        return None if _installed("torchvision") else "torchvision"

    def decode_batch(self, images: list[EncodedImage], device: torch.device) -> list[DecodedImage | None]:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            raise RuntimeError("the job's layout chose nvJPEG, but torchvision is not installed where the pose actor runs")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only bytes: the decoder only reads
            data = [torch.from_numpy(np.frombuffer(image.data, dtype=np.uint8)) for image in images]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except Exception:  # one bad image fails the whole call: find it one at a time
            decoded = []
            for tensor in data:
                try:
                    decoded.extend(decode_jpeg([tensor], mode=ImageReadMode.RGB, device=device))
                except Exception:
                    decoded.append(None)  # Pillow says why
        return [None if pixels is None else DecodedImage(pixels, image.size) for image, pixels in zip(images, decoded)]


# The GPU's JPEG engine first, hybrid for what it cannot take (progressive), then CUDA nvJPEG.
GPU_BACKENDS = ("HW_GPU_ONLY", "HYBRID_CPU_GPU", "GPU_ONLY")


@dataclass(frozen=True)
class NvImageCodecDecoder(PillowDecoder):
    """nvImageCodec: the images' regions (or whole images) in one batched call on `backends`.

    libjpeg-turbo, which Pillow uses, upsamples chroma smoothly ("fancy"); the option asks the
    GPU decoders for the same, which brings their pixels nearer Pillow's.
    """

    name: ClassVar[str] = "nvimgcodec"
    backends: tuple[str, ...] = GPU_BACKENDS
    options: str = ":fancy_upsampling=1"

    def missing(self) -> str | None:
        # Its GPU backends load the nvJPEG library from its own wheel (the gpu extra installs it).
        wheels = {"nvidia.nvimgcodec": "nvidia-nvimgcodec-cu12", "nvidia.nvjpeg": "nvidia-nvjpeg-cu12"}
        return next((wheel for module, wheel in wheels.items() if not _installed(module)), None)

    def decode_batch(self, images: list[EncodedImage], device: torch.device) -> list[DecodedImage | None]:
        cpu_only = self.backends == ("CPU_ONLY",)
        loaded = nvimgcodec_decoder(CPU_ONLY if cpu_only else (device.index or 0), self.backends, self.options)
        if loaded is None:
            raise RuntimeError("the job's layout chose nvImageCodec, but it is not installed where the pose actor runs")
        nvimgcodec, decoder = loaded
        whole = [j for j, image in enumerate(images) if ends_with_end_marker(image.data)]
        streams = []
        for j in whole:
            stream = nvimgcodec.CodeStream(bytes(images[j].data))
            if images[j].region is not None:
                x0, y0, x1, y1 = images[j].region
                stream = stream.get_sub_code_stream(region=nvimgcodec.Region(y0, x0, y1, x1))
            streams.append(stream)
        params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)
        cuda_stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0

        def decode(batch: list) -> tuple[list, bytes]:
            with library_output() as said:
                try:
                    decoded = decoder.decode(batch, params=params, cuda_stream=cuda_stream)
                except Exception:  # the library's own exceptions: Pillow decides
                    decoded = [None] * len(batch)
            return decoded, said()

        decoded, said = decode(streams) if streams else ([], b"")
        if said:  # its words are about some image of the batch: each alone, those it speaks of to Pillow
            decoded = [None if words else alone for (alone,), words in (decode([stream]) for stream in streams)]
        out: list[DecodedImage | None] = [None] * len(images)
        for j, image in zip(whole, decoded):
            if image is not None:
                origin = images[j].region[:2] if images[j].region else (0, 0)
                out[j] = DecodedImage(_tensor(image, device).permute(2, 0, 1), images[j].size, origin)
        return out


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is not there
        return False


def _tensor(image, device: torch.device) -> torch.Tensor:
    """An nvImageCodec image as an (h, w, c) tensor on `device`: zero-copy from a device buffer."""
    if "HOST" in image.buffer_kind.name:
        return torch.from_numpy(np.asarray(image)).to(device)
    return torch.from_dlpack(image).to(device)


def decode_on_device(images: list[EncodedImage], device: torch.device, max_pixels: int,
                     decoder: PillowDecoder = PillowDecoder()) -> list:
    """Each image as a `DecodedImage` on `device`, or the ImageError it failed with.

    The plain JPEGs go to `decoder` in one call; the rest, and what it left, are decoded with
    Pillow as `PillowDecoder` says.
    """
    decoded: list = [None] * len(images)
    batch = [i for i, image in enumerate(images) if image.plain_jpeg]
    if batch and type(decoder) is not PillowDecoder:
        for i, pixels in zip(batch, decoder.decode_batch([images[i] for i in batch], device)):
            if pixels is not None and _fits(pixels, images[i]):
                decoded[i] = pixels
    for i, image in enumerate(images):
        if decoded[i] is not None or image.region is None:
            continue
        region = decode_jpeg_region(image.data, image.region)  # None: Pillow decides, below
        if region is not None:
            decoded[i] = DecodedImage(_to_device(region, device), image.size, image.region[:2])
    for i, image in enumerate(images):
        if decoded[i] is not None:
            continue
        try:
            rgb = np.asarray(decode_image(image.data, max_pixels))
        except ImageError as exc:
            decoded[i] = exc
            continue
        decoded[i] = _checked(DecodedImage(_to_device(rgb, device), image.size), image)
    return decoded


def _to_device(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only array: it is only read
        return torch.from_numpy(rgb).to(device).permute(2, 0, 1)


def _fits(image: DecodedImage, encoded: EncodedImage) -> bool:
    """Whether a GPU decoder's pixels are the whole image or its region, as uint8 RGB (else Pillow decodes it)."""
    pixels = image.pixels
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
        return False
    asked = [((0, 0), encoded.size)] + ([(encoded.region[:2], encoded.region_size)] if encoded.region else [])
    return any(image.origin == tuple(origin) and tuple(pixels.shape[1:]) == (h, w) for origin, (w, h) in asked)


def _checked(image: DecodedImage, encoded: EncodedImage) -> DecodedImage | ImageError:
    """The decoded image, or an ImageError when its pixels are not the size its header says."""
    height, width = image.pixels.shape[1:]
    if (width, height) != encoded.size:
        return ImageError(f"decoded to {width}x{height} but its header says {encoded.size[0]}x{encoded.size[1]}")
    return image
