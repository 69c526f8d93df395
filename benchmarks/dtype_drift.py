#!/usr/bin/env python
"""How far a lower-precision forward (bfloat16 by default) moves keypoints from float32's.

    python benchmarks/dtype_drift.py --preset vitpose-small --images 16

The benchmark's weights are random, so their heatmaps have no clear peak and their keypoints
say little about a trained model's. This measures two things that do not depend on training:

  heatmap noise   rms(heatmaps in DTYPE - in float32) / peak |float32 heatmap|, per map, on the
                  crops of N benchmark JPEGs (the same crops for both dtypes)
  peaked drift    keypoints decoded (`decode_heatmaps`, DARK) from Gaussian heatmaps (sigma 2
                  heatmap pixels, random sub-pixel centres) against the same heatmaps plus
                  i.i.d. noise at the measured median and 99th-percentile levels

and, for the record, how far the random model's own keypoints move. Distances are in heatmap
pixels (1/64 of the crop's height: ~4 px of a 250 px person).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_pose import benchmark_tasks  # noqa: E402

from raypose.config.spec import PoseSpec  # noqa: E402
from raypose.imaging.heatmaps import decode_heatmaps  # noqa: E402
from raypose.models.routing import resolve_routing  # noqa: E402
from raypose.models.vitpose import PoseEngine, inspect_model  # noqa: E402
from raypose.pipeline.arrow_views import crop_array  # noqa: E402
from raypose.pipeline.crop_stage import CropOptions, make_crops  # noqa: E402
from raypose.testing.synthetic import make_checkpoint  # noqa: E402


def heatmaps(engine: PoseEngine, crops) -> torch.Tensor:
    """The model's float heatmaps for uint8 crops (N, H, W, 3), normalised as `PoseEngine.estimate` does."""
    pixels = torch.from_numpy(crops).to(engine.device).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        return engine.model(pixel_values=(pixels * engine._scale + engine._shift).to(engine.dtype)).heatmaps.float().cpu()


def drift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in heatmap pixels between the keypoints decoded from two stacks of heatmaps (..., h, w)."""
    h, w = a.shape[-2:]
    flat = [m.reshape(1, -1, h, w) for m in (a, b)]
    # centre 0, scale 1: image pixels of a 200 px box; back to heatmap pixels per axis
    (ka, _), (kb, _) = (decode_heatmaps(m, torch.zeros(1, 2), torch.ones(1, 2)) for m in flat)
    return ((ka - kb) * torch.tensor([(w - 1) / 200, (h - 1) / 200])).norm(dim=-1).flatten()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vitpose-small")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--images", type=int, default=16, help="benchmark JPEGs to crop")
    p.add_argument("--peaks", type=int, default=2000, help="synthetic peaked heatmaps")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / args.preset, preset=args.preset)
        routing = resolve_routing(PoseSpec(model=str(checkpoint)))
        crops = make_crops(benchmark_tasks(Path(tmp), args.images), options=CropOptions(routing=routing))
        info = inspect_model(str(checkpoint))
        good = [i for i, stage in enumerate(crops.column("error_stage").to_pylist()) if stage is None]
        array = crop_array(crops.column("crop").combine_chunks(), good, info.input_size)
        full = heatmaps(PoseEngine(info, device=args.device, dtype="float32"), array)
        low = heatmaps(PoseEngine(info, device=args.device, dtype=args.dtype), array)

    noise = (low - full).flatten(2).pow(2).mean(-1).sqrt() / full.flatten(2).abs().amax(-1)
    levels = {"median": noise.median().item(), "p99": noise.quantile(0.99).item()}
    moved = drift(full, low)
    print(f"{args.preset} on {args.device}, {args.dtype} vs float32, {len(good)} crops x {full.shape[1]} heatmaps")
    print(f"  heatmap noise (rms / peak): median {levels['median']:.4f}, p99 {levels['p99']:.4f}")
    print(f"  random model's keypoints: moved median {moved.median():.3f}, p90 {moved.quantile(0.9):.3f} heatmap px, "
          f"{(moved > 1).float().mean():.1%} by more than 1 (flat heatmaps: near-ties flip)")
    g = torch.Generator().manual_seed(0)
    h, w = full.shape[-2:]
    cy = torch.rand(args.peaks, generator=g) * (h - 8) + 4
    cx = torch.rand(args.peaks, generator=g) * (w - 8) + 4
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    peaked = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * 2.0**2))
    for name, level in levels.items():
        moved = drift(peaked, peaked + torch.randn(peaked.shape, generator=g) * level)
        print(f"  peaked heatmaps + {name} noise: moved median {moved.median():.3f}, p99 {moved.quantile(0.99):.3f} heatmap px")


if __name__ == "__main__":
    main()
