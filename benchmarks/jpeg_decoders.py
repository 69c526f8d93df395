"""What each JPEG decoder costs and how far its pixels are from Pillow's, on the crops' regions of benchmark photos.

For N benchmark JPEGs (the mixed set) the crop stage's planning gives each image the region its
crops read (`crop_stage.plan_device_crops`). Each decoder then decodes those images (whole, or
the region where it can) and the same crops are cut from its pixels (`crop_torch.bilinear_crops`);
the crops are compared with the CPU stage's (Pillow's pixels): mean, p99 and max absolute
difference in grey levels, and wall ms per image. Rows:

- `pillow`: the device cropper's decode (`decode_device.decode_on_device`) with no region: Pillow, whole images
- `nvimgcodec cpu regions`: the same with the regions: nvImageCodec's CPU decode (`jpeg_region`), else Pillow
- with CUDA, each GPU decoder of `images.gpu_decoder` as the device cropper runs it (what it cannot
  take goes to Pillow): `nvimgcodec` (the GPU's JPEG engine, hybrid for progressive files, CUDA
  nvJPEG; the regions, batched), `nvjpeg` (torchvision, whole images, batched); and each of
  nvImageCodec's GPU backends alone (`nvimgcodec HW_GPU_ONLY` ...), with and without fancy upsampling

    python benchmarks/jpeg_decoders.py --images 60 [--model TRAINED_VITPOSE_FOLDER]

With --model (a trained checkpoint: random weights have no clear peaks) each row also gives how
far the decoder's crops move the model's keypoints from those of Pillow's crops (image pixels,
over the keypoints it scores >= 0.3 on Pillow's).
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

from profile_pose import benchmark_tasks

from raypose.config.spec import PoseSpec
from raypose.imaging.crop_torch import ImagesOnDevice
from raypose.imaging.decode_device import (
    DecodedImage,
    NvImageCodecDecoder,
    NvjpegDecoder,
    PillowDecoder,
    decode_on_device,
)
from raypose.inputs.fetch import read_images
from raypose.models.routing import resolve_routing
from raypose.pipeline.arrow_views import pairs
from raypose.pipeline.crop_stage import CropOptions, make_crops, plan_device_crops
from raypose.testing.synthetic import make_checkpoint

CONFIDENT = 0.3  # keypoint drift is over the keypoints the model scores at least this on Pillow's crops


def pillow(images, device):
    return decode_on_device([replace(image, region=None) for image in images], device, 10**9)


def decoding_with(decoder: PillowDecoder):
    """The device cropper's decode with `decoder` (Pillow for what it leaves)."""
    return lambda images, device: decode_on_device(images, device, 10**9, decoder)


def measure(name, decode, images, rows, reference, device, input_size, engine=None) -> dict:
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
    crops = on_device.crops(centers[good], scales[good], image_of[good].tolist(), input_size).cpu().numpy()
    diff = np.abs(crops.astype(np.int16) - reference[good].astype(np.int16))
    result = {"decoder": name, "ms_per_image": 1000 * seconds / len(images), "mean": float(diff.mean()),
              "p99": float(np.percentile(diff, 99)), "max": int(diff.max())}
    if engine is not None:  # how far the decoder's pixels move a trained model's keypoints, in image pixels
        expected, scores = engine.estimate(reference[good], centers[good], scales[good])
        keypoints, _ = engine.estimate(crops, centers[good], scales[good])
        drift = np.linalg.norm(keypoints - expected, axis=-1)[scores >= CONFIDENT]
        result.update(drift_mean=float(drift.mean()), drift_p99=float(np.percentile(drift, 99)),
                      drift_max=float(drift.max()), drift_keypoints=int(drift.size))
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--model", default=None,
                        help="a trained ViTPose checkpoint (folder): also report the keypoint drift each decoder causes")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out or tmp)
        tasks = read_images(benchmark_tasks(folder, args.images), storage_options={})
        routing = resolve_routing(PoseSpec(model=args.model or str(make_checkpoint(folder / "model"))))
        input_size = routing.input_size(routing.default)
        engine = None
        if args.model:
            from raypose.models.vitpose import PoseEngine

            engine = PoseEngine(routing.experts[routing.default].model, device=str(device), dtype="float32")
        options = CropOptions(routing=routing, max_pixels=10**9)
        rows, images = plan_device_crops(tasks, options)
        cpu = make_crops(tasks, options=CropOptions(routing=routing, max_pixels=10**9, region_decode=False))
        width, height = input_size
        reference = np.zeros((cpu.num_rows, height, width, 3), np.uint8)
        for i, crop in enumerate(cpu.column("crop").to_pylist()):
            if crop is not None:
                reference[i] = np.frombuffer(crop, np.uint8).reshape(height, width, 3)
        decoders = [("pillow", pillow), ("nvimgcodec cpu regions", decoding_with(PillowDecoder()))]
        if device.type == "cuda":
            decoders += [(decoder.name, decoding_with(decoder)) for decoder in (NvImageCodecDecoder(), NvjpegDecoder())
                         if decoder.missing() is None]
            decoders += [(f"nvimgcodec {kind}{'' if upsampling else ' plain upsampling'}",
                          decoding_with(NvImageCodecDecoder(backends=(kind,), options=upsampling)))
                         for kind in ("HW_GPU_ONLY", "HYBRID_CPU_GPU", "GPU_ONLY")
                         for upsampling in (":fancy_upsampling=1", "")]
        results = []
        regions = sum(image.region is not None for image in images)
        print(f"{len(images)} images, {rows.num_rows} crops, {regions} decoded as regions where a decoder can; "
              f"{device}; crops against the CPU stage's from Pillow, grey levels")
        print(f"{'decoder':34s} {'ms/image':>9s} {'mean':>7s} {'p99':>5s} {'max':>4s}"
              + ("  keypoint drift px (mean / p99 / max)" if engine else ""))
        for name, decode in decoders:
            try:
                result = measure(name, decode, images, rows, reference, device, input_size, engine)
            except Exception as exc:  # one decoder's failure is a row, the others still run
                print(f"{name:34s} failed: {type(exc).__name__}: {exc}")
                continue
            results.append(result)
            drift = (f"  {result['drift_mean']:.3f} / {result['drift_p99']:.3f} / {result['drift_max']:.2f} "
                     f"over {result['drift_keypoints']} keypoints scored >= {CONFIDENT}") if engine else ""
            print(f"{name:34s} {result['ms_per_image']:9.1f} {result['mean']:7.3f} {result['p99']:5.1f} "
                  f"{result['max']:4d}{drift}")
    return results


if __name__ == "__main__":
    main()
