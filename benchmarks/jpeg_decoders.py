"""What each JPEG decoder costs and how far its pixels are from Pillow's, on the crops' regions of benchmark photos.

For N benchmark JPEGs (the mixed set) the crop stage's planning gives each image the region its
crops read (`crop_stage.plan_device_crops`). Each decoder then decodes those images (whole, or
the region where it can) and the same crops are cut from its pixels (`crop_torch.bilinear_crops`);
the crops are compared with the CPU stage's (Pillow's pixels): mean, p99 and max absolute
difference in grey levels, and wall ms per image. Rows:

- `pillow`: the device cropper's decode (`crop_torch.decode_on_device`) with no region: Pillow, whole images
- `nvimgcodec cpu regions`: the same with the regions: nvImageCodec's CPU decode (`jpeg_region`), else Pillow
- with CUDA: `nvjpeg (torchvision)`, whole images in one batched call, as `crop_in: pose_device` does;
  `nvimgcodec <backend> regions`: nvImageCodec's GPU backends (HW_GPU_ONLY, the GPU's JPEG
  engine; HYBRID_CPU_GPU; GPU_ONLY), the regions in one batched call, on the device

    python benchmarks/jpeg_decoders.py --images 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from profile_pose import benchmark_tasks  # noqa: E402

from raypose.config.spec import PoseSpec  # noqa: E402
from raypose.imaging.crop_torch import (  # noqa: E402
    DecodedImage,
    ImagesOnDevice,
    decode_on_device,
    gpu_jpeg_decoder,
)
from raypose.inputs.fetch import read_images  # noqa: E402
from raypose.models.routing import resolve_routing  # noqa: E402
from raypose.pipeline.crop_stage import (  # noqa: E402
    CropOptions,
    make_crops,
    pairs,
    plan_device_crops,
)
from raypose.testing.synthetic import make_checkpoint  # noqa: E402

INPUT_SIZE = (192, 256)


def pillow(images, device):
    return decode_on_device([replace(image, region=None) for image in images], device, 10**9, nvjpeg=False)


def cpu_regions(images, device):  # the device cropper's own decode without nvJPEG: regions, else Pillow
    return decode_on_device(images, device, 10**9, nvjpeg=False)


def torchvision_nvjpeg(images, device):  # what `crop_in: pose_device` decodes with on a GPU
    return decode_on_device(images, device, 10**9, nvjpeg=True)


def nvimgcodec_regions(kind: str):
    from nvidia import nvimgcodec

    decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))])

    def decode(images, device):
        streams = []
        for image in images:
            stream = nvimgcodec.CodeStream(bytes(image.data))
            if image.region:
                x0, y0, x1, y1 = image.region
                stream = stream.get_sub_code_stream(region=nvimgcodec.Region(y0, x0, y1, x1))
            streams.append(stream)
        decoded = decoder.decode(streams)
        torch.cuda.synchronize()
        out = []
        for image, pixels in zip(images, decoded):
            if pixels is None:  # this backend cannot take it: Pillow, as the product would fall back
                out += pillow([image], device)
                continue
            tensor = torch.as_tensor(pixels, device=device).permute(2, 0, 1)
            out.append(DecodedImage(tensor, image.size, image.region[:2] if image.region else (0, 0)))
        return out

    return decode


def measure(name, decode, images, rows, reference, device) -> dict:
    decode(images[:2], device)  # warm-up: libraries, the device
    started = time.perf_counter()
    decoded = decode(images, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    failed = [str(image) for image in decoded if not isinstance(image, DecodedImage)]
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark images did not decode: {failed[0]}")
    on_device = ImagesOnDevice(decoded)
    image_of = np.empty(rows.num_rows, np.int64)
    for n, image in enumerate(images):
        image_of[image.rows] = n
    good = [i for i, stage in enumerate(rows.column("error_stage").to_pylist()) if stage is None]
    centers, scales = pairs(rows.column("center")), pairs(rows.column("scale"))
    crops = on_device.crops(centers[good], scales[good], image_of[good].tolist(), INPUT_SIZE).cpu().numpy()
    diff = np.abs(crops.astype(np.int16) - reference[good].astype(np.int16))
    return {"decoder": name, "ms_per_image": 1000 * seconds / len(images), "mean": float(diff.mean()),
            "p99": float(np.percentile(diff, 99)), "max": int(diff.max())}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out or tmp)
        tasks = read_images(benchmark_tasks(folder, args.images), storage_options={})
        routing = resolve_routing(PoseSpec(model=str(make_checkpoint(folder / "model"))))  # 192x256 crops
        options = CropOptions(routing=routing, max_pixels=10**9)
        rows, images = plan_device_crops(tasks, options)
        cpu = make_crops(tasks, options=CropOptions(routing=routing, max_pixels=10**9, region_decode=False))
        width, height = INPUT_SIZE
        reference = np.zeros((cpu.num_rows, height, width, 3), np.uint8)
        for i, crop in enumerate(cpu.column("crop").to_pylist()):
            if crop is not None:
                reference[i] = np.frombuffer(crop, np.uint8).reshape(height, width, 3)
        decoders = [("pillow", pillow), ("nvimgcodec cpu regions", cpu_regions)]
        if device.type == "cuda":
            if gpu_jpeg_decoder() is not None:
                decoders.append(("nvjpeg (torchvision)", torchvision_nvjpeg))
            decoders += [(f"nvimgcodec {kind} regions", nvimgcodec_regions(kind))
                         for kind in ("HW_GPU_ONLY", "HYBRID_CPU_GPU", "GPU_ONLY")]
        results = []
        regions = sum(image.region is not None for image in images)
        print(f"{len(images)} images, {rows.num_rows} crops, {regions} decoded as regions where a decoder can; "
              f"{device}; crops against the CPU stage's from Pillow, grey levels")
        print(f"{'decoder':34s} {'ms/image':>9s} {'mean':>7s} {'p99':>5s} {'max':>4s}")
        for name, decode in decoders:
            try:
                result = measure(name, decode, images, rows, reference, device)
            except Exception as exc:  # one decoder's failure is a row, the others still run
                print(f"{name:34s} failed: {type(exc).__name__}: {exc}")
                continue
            results.append(result)
            print(f"{name:34s} {result['ms_per_image']:9.1f} {result['mean']:7.3f} {result['p99']:5.1f} {result['max']:4d}")
    return results


if __name__ == "__main__":
    main()
