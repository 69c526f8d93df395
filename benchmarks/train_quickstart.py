"""Train the quickstart's tiny ViTPose on raypose's own drawn figures, so its keypoints land on them.

    python benchmarks/train_quickstart.py                      # writes jobs/quickstart/vitpose-tiny/
    python benchmarks/train_quickstart.py --steps 200 --out /tmp/ckpt   # a short try

The figures `raypose.testing.synthetic.draw_people` draws have known joints (`figure_keypoints`), so
training needs no data set and no network: pictures are drawn, cut with raypose's own crop
(`crop_image`, the reference's UDP geometry) and the targets are Gaussian heatmaps at the joints,
placed with the exact inverse of raypose's heatmap -> image mapping (`heatmaps.heatmap_to_image`). Deterministic:
seeded drawing, seeded initialisation, one thread, deterministic torch kernels.

At the end it measures the checkpoint on figures it never saw, through raypose's own decoding: the
mean keypoint error in pixels and as a share of the box height, PCK@0.05 and @0.1 (of the box height),
and the same for the random-weight model it started from. benchmarks/README.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from raypose.imaging.crop_cpu import crop_image
from raypose.imaging.geometry import PIXEL_STD, center_scale_from_boxes
from raypose.imaging.heatmaps import decode_heatmaps
from raypose.testing.synthetic import draw_people, figure_keypoints, make_checkpoint

INPUT_SIZE = (192, 256)  # width, height
HEATMAP_SIZE = (64, 48)  # height, width
SIGMA = 2.0  # heatmap pixels, as ViTPose's training targets
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def drawn_crops(count: int, seed: int) -> tuple[np.ndarray, ...]:
    """`count` crops of drawn figures: (N, 256, 192, 3) uint8, their joints in image pixels (N, 17, 2),
    each crop's center and scale, and its figure's box height."""
    rng = np.random.default_rng(seed)
    crops, joints, centers, scales, heights = [], [], [], [], []
    while len(crops) < count:
        width, height = int(rng.integers(320, 800)), int(rng.integers(320, 800))
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            h = rng.uniform(0.3, 0.9) * height
            w = min(h * rng.uniform(0.3, 0.7), width * 0.9)
            boxes.append([rng.uniform(0, width - w), rng.uniform(0, height - h), w, h])
        boxes = np.round(np.array(boxes), 2)
        image = np.asarray(draw_people(width, height, boxes, seed=int(rng.integers(1 << 30))))
        center, scale = center_scale_from_boxes(boxes, INPUT_SIZE)
        for i, box in enumerate(boxes):
            crops.append(crop_image(image, center[i], scale[i], INPUT_SIZE))
            joints.append(np.array(figure_keypoints(box.tolist()), np.float64).reshape(17, 3)[:, :2])
            centers.append(center[i])
            scales.append(scale[i])
            heights.append(box[3])
    return tuple(np.stack(values[:count]) for values in (crops, joints, centers, scales, heights))


def heatmap_targets(joints: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> torch.Tensor:
    """Gaussian heatmaps (N, 17, 64, 48) peaked where `heatmap_to_image` maps back onto the joints."""
    height, width = HEATMAP_SIZE
    box = scales * PIXEL_STD
    origin = centers - 0.5 * box
    unit = box / np.array([width - 1.0, height - 1.0])
    at = (joints - origin[:, None, :]) / unit[:, None, :]  # (N, 17, 2) in heatmap pixels
    ys, xs = np.mgrid[0:height, 0:width]
    dx = xs[None, None] - at[..., 0, None, None]
    dy = ys[None, None] - at[..., 1, None, None]
    return torch.from_numpy(np.exp(-(dx ** 2 + dy ** 2) / (2 * SIGMA ** 2)).astype(np.float32))


def normalised(crops: np.ndarray) -> torch.Tensor:
    """uint8 HWC crops -> the model's input, as raypose's engine feeds it."""
    pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def keypoint_errors(model, crops, joints, centers, scales, box_heights) -> dict[str, float]:
    """Mean error and PCK of the model's keypoints (raypose's decode) against the known joints."""
    model.eval()
    with torch.no_grad():
        heatmaps = torch.cat([model(pixel_values=normalised(crops[i:i + 64])).heatmaps
                              for i in range(0, len(crops), 64)])
    predicted = decode_heatmaps(heatmaps, torch.from_numpy(centers), torch.from_numpy(scales))[0].numpy()
    error = np.linalg.norm(predicted - joints, axis=-1)  # (N, 17) pixels
    relative = error / box_heights[:, None]
    return {"mean_error_px": float(error.mean()), "mean_error_of_box_height": float(relative.mean()),
            "pck@0.05": float((relative < 0.05).mean()), "pck@0.1": float((relative < 0.1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="jobs/quickstart/vitpose-tiny")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-crops", type=int, default=1500)
    parser.add_argument("--eval-crops", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    from transformers import VitPoseForPoseEstimation

    out = Path(args.out)
    make_checkpoint(out, preset="tiny-trained", seed=args.seed)
    model = VitPoseForPoseEstimation.from_pretrained(out)
    train = drawn_crops(args.train_crops, seed=args.seed + 1)
    held_out = drawn_crops(args.eval_crops, seed=args.seed + 2)
    before = keypoint_errors(model, *held_out)
    targets = heatmap_targets(*train[1:4])
    inputs = normalised(train[0])
    drawn = time.perf_counter()

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    order = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        batch = torch.randint(0, len(inputs), (args.batch,), generator=order)
        loss = torch.nn.functional.mse_loss(model(pixel_values=inputs[batch]).heatmaps, targets[batch]) * 1000
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - drawn:.0f} s)", flush=True)
    trained = time.perf_counter()

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    after = keypoint_errors(model, *held_out)
    report = {
        "steps": args.steps, "batch": args.batch, "train_crops": args.train_crops, "eval_crops": args.eval_crops,
        "seconds": {"draw": round(drawn - started, 1), "train": round(trained - drawn, 1)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "random_weights": before, "trained": after,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
