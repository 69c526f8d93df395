"""decode_device: each decoder's pixels, and what falls back to Pillow (the reference's pixels or its error)."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.crop_torch import ImagesOnDevice
from raypose.imaging.decode import decode_image, probe_image
from raypose.imaging.decode_device import (
    DecodedImage,
    EncodedImage,
    NvImageCodecDecoder,
    NvjpegDecoder,
    PillowDecoder,
    decode_on_device,
)
from raypose.imaging.geometry import center_scale_from_boxes, crops_source_region

CPU = torch.device("cpu")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nvImageCodec has Linux wheels only")


def jpeg(pixels: np.ndarray, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1)
    return np.clip(pixels + rng.integers(-40, 40, pixels.shape), 0, 255).astype(np.uint8)


def encoded(data: bytes, region=None) -> EncodedImage:
    header = probe_image(data, 10**8)
    return EncodedImage(data, header.size, header.plain_jpeg, region=region)


def pillow(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data, 10**8))


def pixels_of(image: DecodedImage) -> np.ndarray:
    return image.pixels.permute(1, 2, 0).cpu().numpy()


def test_an_image_that_fails_to_decode_is_its_image_error():
    data = jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    truncated = encoded(data[: len(data) // 2])  # a whole header, half the pixels
    [error] = decode_on_device([truncated], CPU, 10**8)
    assert error.stage == "decode" and str(error).startswith("corrupt or truncated")


def test_an_image_decoded_to_another_size_than_its_header_fails():
    image = encoded(jpeg(np.zeros((131, 97, 3), np.uint8)))
    image.size = (98, 131)
    [error] = decode_on_device([image], CPU, 10**8)
    assert str(error) == "decoded to 97x131 but its header says 98x131"


@dataclass(frozen=True)
class Answering(PillowDecoder):
    """A stand-in GPU decoder: answers each image with `answer(image)` and records what it was given."""

    answer: object = None
    given: list = None

    def decode_batch(self, images, device):
        self.given.append([image.size for image in images])
        return [self.answer(image) for image in images]


def test_a_gpu_decoder_takes_the_plain_jpegs_in_one_call_and_pillow_the_rest():
    png = io.BytesIO()
    Image.fromarray(photo(30, 20)).save(png, "PNG")
    images = [encoded(jpeg(photo(40, 30))), encoded(png.getvalue()), encoded(jpeg(photo(50, 20)))]
    given = []
    marked = Answering(lambda image: DecodedImage(torch.full((3, image.size[1], image.size[0]), 7, dtype=torch.uint8),
                                                   image.size), given)
    decoded = decode_on_device(images, CPU, 10**8, marked)
    assert given == [[(40, 30), (50, 20)]]
    assert (pixels_of(decoded[0]) == 7).all() and (pixels_of(decoded[2]) == 7).all()
    np.testing.assert_array_equal(pixels_of(decoded[1]), pillow(png.getvalue()))


@linux_only
@pytest.mark.parametrize("answer", [
    lambda image: None,  # it cannot take the image
    lambda image: DecodedImage(torch.zeros((3, 5, 5), dtype=torch.uint8), image.size),  # another size
    lambda image: DecodedImage(torch.zeros((1, image.size[1], image.size[0]), dtype=torch.uint8), image.size),  # grey
    lambda image: DecodedImage(torch.zeros((3, 10, 10), dtype=torch.uint8), image.size, (3, 3)),  # not its region
], ids=["none", "size", "channels", "origin"])
def test_what_a_gpu_decoder_gets_wrong_is_decoded_by_pillow(answer):
    data = jpeg(photo(40, 30))
    [image] = decode_on_device([encoded(data, region=(2, 4, 30, 20))], CPU, 10**8, Answering(answer, []))
    assert image.origin == (2, 4)  # Pillow's path: the region alone, on the CPU (`jpeg_region`)
    np.testing.assert_array_equal(pixels_of(image), pillow(data)[4:20, 2:30])


def test_nvjpeg_chosen_without_torchvision_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(RuntimeError, match="torchvision is not installed"):
        decode_on_device([encoded(jpeg(np.zeros((8, 8, 3), np.uint8)))], CPU, 10**8, NvjpegDecoder())


# The GPU decoder's code path on the CPU: nvImageCodec's CPU backend (libjpeg-turbo) in its place,
# whose pixels are Pillow's, so the batching, the regions and the fallbacks are checked exactly.
CPU_NVIMGCODEC = NvImageCodecDecoder(backends=("CPU_ONLY",))


@linux_only
def test_nvimgcodec_decodes_a_batch_of_regions_and_whole_images():
    kinds = [jpeg(photo(97, 131, 1)), jpeg(photo(160, 120, 2), subsampling=0), jpeg(photo(80, 60, 3), progressive=True),
             jpeg(photo(64, 48, 4)[..., 0])]
    regions = [(5, 9, 60, 100), None, (0, 0, 80, 1), (63, 47, 64, 48)]
    images = [encoded(data, region) for data, region in zip(kinds, regions)]
    decoded = CPU_NVIMGCODEC.decode_batch(images, CPU)
    for image, data, region in zip(decoded, kinds, regions):
        x0, y0, x1, y1 = region or (0, 0, *encoded(data).size)
        assert image.origin == (x0, y0)
        np.testing.assert_array_equal(pixels_of(image), pillow(data)[y0:y1, x0:x1])


@linux_only
def test_nvimgcodec_crops_equal_the_cpu_crops():
    data = jpeg(photo(200, 150, 5))
    size = (48, 64)
    centers, scales = center_scale_from_boxes(np.array([[20, 30, 60, 90], [100, 40, 70, 80]], np.float64), size)
    region = crops_source_region([(c, s, size) for c, s in zip(centers, scales)], (200, 150))
    assert region != (0, 0, 200, 150)
    [image] = decode_on_device([encoded(data, region)], CPU, 10**8, CPU_NVIMGCODEC)
    assert image.origin == region[:2]
    ours = ImagesOnDevice([image]).crops(centers, scales, [0, 0], size).numpy()
    np.testing.assert_array_equal(ours, np.stack([crop_image(pillow(data), c, s, size) for c, s in zip(centers, scales)]))


@linux_only
def test_nvimgcodec_leaves_damaged_files_to_pillow_and_still_decodes_the_rest():
    good = jpeg(photo(120, 90, 6))
    half = len(good) // 2
    flipped = good[:half] + bytes(b ^ 0xFF for b in good[half : half + 64]) + good[half + 64 :]  # libjpeg warns
    cut_short = good[: int(len(good) * 0.7)]
    images = [encoded(good), encoded(flipped), encoded(cut_short), encoded(good, (0, 0, 120, 10))]
    decoded = CPU_NVIMGCODEC.decode_batch(images, CPU)
    assert decoded[1] is None and decoded[2] is None  # the words were its; a file cut short never reaches it
    np.testing.assert_array_equal(pixels_of(decoded[0]), pillow(good))
    np.testing.assert_array_equal(pixels_of(decoded[3]), pillow(good)[:10])
    results = decode_on_device(images, CPU, 10**8, CPU_NVIMGCODEC)
    np.testing.assert_array_equal(pixels_of(results[1]), pillow(flipped))  # Pillow decodes it as the reference does
    assert type(results[2]).__name__ == "ImageError"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decoder", [NvImageCodecDecoder(), NvjpegDecoder()], ids=lambda d: d.name)
def test_gpu_decoders_crops_are_close_to_pillows(decoder):
    if decoder.missing():
        pytest.skip(f"{decoder.missing()} is not installed")
    rng = np.random.default_rng(4)
    smooth = np.clip(rng.normal(128, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
    data = jpeg(np.asarray(Image.fromarray(smooth).resize((640, 480), Image.BILINEAR)))
    size = (192, 256)
    centers, scales = center_scale_from_boxes(np.array([[100, 50, 200, 300], [400, 100, 150, 300]], np.float64), size)
    region = crops_source_region([(c, s, size) for c, s in zip(centers, scales)], (640, 480))
    [pixels] = decoder.decode_batch([encoded(data, region)], torch.device("cuda"))  # no Pillow to fall back to
    assert pixels is not None and pixels.pixels.device.type == "cuda"
    ours = ImagesOnDevice([pixels]).crops(centers, scales, [0, 0], size).cpu().numpy().astype(int)
    reference = pillow(data)
    expected = np.stack([crop_image(reference, c, s, size) for c, s in zip(centers, scales)]).astype(int)
    difference = np.abs(ours - expected)
    # nvJPEG's IDCT and chroma upsampling round differently from libjpeg-turbo's (H200, torchvision: mean 1.16 here).
    p99 = np.percentile(difference, 99)
    assert difference.mean() < 2.0 and p99 <= 10, (difference.mean(), p99, difference.max())
