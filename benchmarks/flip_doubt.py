#!/usr/bin/env python
"""Does the flip disagreement point at the wrong pseudo-labels? A small ViTPose trained here on drawn people with known joints.

    python benchmarks/flip_doubt.py                                   # ~15 min on one CPU thread
    python benchmarks/flip_doubt.py --steps 100 --train 500 --test 200  # a smoke run

No trained checkpoint is reachable offline, so this trains one: a ViTPose (transformers'
`VitPoseForPoseEstimation`, ViTPose's shape at half the resolution: 128x96 input, 16-pixel
patches, 4 layers of 96, simple decoder) on articulated stick figures whose
17 COCO joints are known, drawn with what makes real pseudo-labels go wrong: the figure faces
the camera or away (which side is its left follows from a face drawn on the head, or its
absence), its head is sometimes hidden behind a block (then left and right cannot be told),
other people overlap the box, a block hides a limb, the background is noisy. Training uses
the usual flip augmentation (mirror, swap left/right), UDP Gaussian targets and MSE, on a
fixed set of --train drawn instances (--steps batches drawn from it); the test
set is labelled through raypose's own path (`PoseEngine.submit` with the flip test and
`flip_views`: crops cut by `crop_image`, DARK decode, `keypoint_flip_errors`,
`flip_agreements`, `instance_doubts`), and each instance's real error is its OKS to the known
joints (COCO sigmas, the box's area).

It reports, for the instances whose pseudo-label is wrong (OKS < --wrong, default 0.5), how
well each ordering finds them: AUROC (and a bootstrap 95% interval of its gain over
instance_score), the precision of the worst 10% and 20%, and Spearman's
rank correlation with 1 - OKS; for `1 - instance_score` (today's `render --order worst`),
`1 - flip_oks`, `instance_doubt`, `1 - instance_score x flip_oks` (the first candidate for the
doubt) and the mean keypoint flip error; also the same on the
instances whose keypoint scores are high (instance_score above its median), where scores
alone are sure and disagreement must do the work; and what `flip_views` costs per crop on
this CPU (`decode_cost`). A JSON of the figures goes to --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from raypose.imaging.crop_cpu import crop_image  # noqa: E402
from raypose.imaging.geometry import PIXEL_STD, center_scale_from_boxes  # noqa: E402
from raypose.imaging.heatmaps import instance_scores  # noqa: E402
from raypose.imaging.keypoint_schemas import COCO17  # noqa: E402
from raypose.imaging.uncertainty import (  # noqa: E402
    flip_agreements,
    flip_oks,
    instance_doubts,
    keypoint_flip_errors,
)

INPUT = (96, 128)  # (width, height) of the model's crops
HEATMAP = (24, 32)
NAMES = COCO17.keypoints
INDEX = {name: i for i, name in enumerate(NAMES)}
SWAP = np.arange(17)
for _a, _b in COCO17.flip_pairs:
    SWAP[_a], SWAP[_b] = _b, _a


# --- drawn people with known joints -------------------------------------------------------------

def pose(rng: np.random.Generator, box: np.ndarray, facing: int) -> np.ndarray:
    """17 COCO joints (x, y) of a figure in xywh `box`; facing +1 = towards the camera (its left on the image's right)."""
    x, y, w, h = box
    cx = x + w / 2 + rng.normal(0, 0.03) * w
    joints = np.zeros((17, 2))
    head = np.array([cx, y + 0.09 * h])
    joints[INDEX["nose"]] = head + [0, 0.02 * h]
    for side, sign in (("left", facing), ("right", -facing)):
        joints[INDEX[f"{side}_eye"]] = head + [sign * 0.025 * h, -0.005 * h]
        joints[INDEX[f"{side}_ear"]] = head + [sign * 0.055 * h, 0.0]
        shoulder = np.array([cx + sign * 0.11 * h, y + 0.22 * h])
        hip = np.array([cx + sign * 0.06 * h, y + 0.55 * h])
        joints[INDEX[f"{side}_shoulder"]], joints[INDEX[f"{side}_hip"]] = shoulder, hip
        # arm and leg angles from straight down, outward positive on this side
        upper, lower = rng.uniform(-0.3, 2.6), rng.uniform(-0.6, 1.8)
        elbow = shoulder + 0.16 * h * np.array([sign * math.sin(upper), math.cos(upper)])
        wrist = elbow + 0.15 * h * np.array([sign * math.sin(upper + lower), math.cos(upper + lower)])
        thigh, shin = rng.uniform(-0.25, 0.7), rng.uniform(-0.9, 0.2)
        knee = hip + 0.22 * h * np.array([sign * math.sin(thigh), math.cos(thigh)])
        ankle = knee + 0.21 * h * np.array([sign * math.sin(thigh + shin), math.cos(thigh + shin)])
        joints[INDEX[f"{side}_elbow"]], joints[INDEX[f"{side}_wrist"]] = elbow, wrist
        joints[INDEX[f"{side}_knee"]], joints[INDEX[f"{side}_ankle"]] = knee, ankle
    return joints


def draw_figure(draw: ImageDraw.ImageDraw, joints: np.ndarray, box: np.ndarray, facing: int, colour) -> None:
    """Limbs in one colour (left and right alike), a head with a face when it faces the camera, hair when not."""
    h = box[3]
    width = max(2, int(h / 28))
    j = {name: tuple(joints[INDEX[name]]) for name in NAMES}
    mid_shoulder = tuple((joints[INDEX["left_shoulder"]] + joints[INDEX["right_shoulder"]]) / 2)
    mid_hip = tuple((joints[INDEX["left_hip"]] + joints[INDEX["right_hip"]]) / 2)
    for a, b in (("left_shoulder", "right_shoulder"), ("left_hip", "right_hip")):
        draw.line([j[a], j[b]], fill=colour, width=width)
    draw.line([mid_shoulder, mid_hip], fill=colour, width=width)
    for side in ("left", "right"):
        draw.line([j[f"{side}_shoulder"], j[f"{side}_elbow"], j[f"{side}_wrist"]], fill=colour, width=width)
        draw.line([j[f"{side}_hip"], j[f"{side}_knee"], j[f"{side}_ankle"]], fill=colour, width=width)
    head = np.array(j["nose"]) - [0, 0.02 * h]
    r = 0.065 * h
    draw.ellipse([head[0] - r, head[1] - r, head[0] + r, head[1] + r], fill=colour if facing < 0 else None,
                 outline=colour, width=width)
    if facing > 0:  # a face: eyes and a nose, so the figure's left is on the image's right
        e = max(1.5, h / 70)
        for name in ("left_eye", "right_eye"):
            ex, ey = j[name]
            draw.ellipse([ex - e, ey - e, ex + e, ey + e], fill=(20, 20, 20))
        nx, ny = j["nose"]
        draw.ellipse([nx - e, ny - e, nx + e, ny + e], fill=(220, 40, 40))


def scene(rng: np.random.Generator, hard: float) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """A 200x240 picture with one labelled figure (box, joints) and, with probability `hard` each, what makes it hard."""
    width, height = 200, 240
    noise = rng.integers(0, 90, (height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((width, height), Image.BILINEAR)
    image = Image.fromarray(np.clip(np.asarray(image, np.int16) + rng.integers(-25, 25, (height, width, 3)), 0, 255)
                            .astype(np.uint8))
    draw = ImageDraw.Draw(image)
    bh = rng.uniform(120, 200)
    box = np.array([rng.uniform(10, width - 0.5 * bh - 10), rng.uniform(5, height - bh - 5), 0.5 * bh, bh])
    facing = int(rng.choice([1, -1]))
    joints = pose(rng, box, facing)
    if rng.random() < hard:  # someone else in the box
        other = box + [rng.uniform(-0.6, 0.6) * box[2], rng.uniform(-0.2, 0.2) * bh, 0, 0]
        other_facing = int(rng.choice([1, -1]))
        draw_figure(draw, pose(rng, other, other_facing), other, other_facing, tuple(rng.integers(90, 256, 3).tolist()))
    draw_figure(draw, joints, box, facing, tuple(rng.integers(120, 256, 3).tolist()))
    if rng.random() < hard:  # the head hidden: left and right cannot be told
        top = joints[INDEX["nose"]] - [0.12 * bh, 0.13 * bh]
        draw.rectangle([*top, *(top + [0.24 * bh, 0.2 * bh])], fill=tuple(rng.integers(0, 120, 3).tolist()))
    if rng.random() < hard:  # a block over a limb
        k = joints[rng.choice([INDEX[n] for n in NAMES if n.endswith(("elbow", "wrist", "knee", "ankle"))])]
        s = rng.uniform(0.1, 0.2) * bh
        draw.rectangle([*(k - s / 2), *(k + s / 2)], fill=tuple(rng.integers(0, 256, 3).tolist()))
    return image, box, joints


def crops_of(rng: np.random.Generator, n: int, hard: float):
    """n crops (N, H, W, 3) uint8 as raypose cuts them, their centers/scales, boxes and joints in image pixels."""
    crops, centers, scales, boxes, joints = [], [], [], [], []
    for _ in range(n):
        image, box, kp = scene(rng, hard)
        center, scale = center_scale_from_boxes(box[None], INPUT)
        crops.append(crop_image(np.asarray(image), center[0], scale[0], INPUT))
        centers.append(center[0]), scales.append(scale[0]), boxes.append(box), joints.append(kp)
    return np.stack(crops), np.stack(centers), np.stack(scales), np.stack(boxes), np.stack(joints)


def to_heatmap(joints: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Image pixels -> heatmap coordinates (UDP: the crop box's ends on the first and last heatmap pixel)."""
    box = scales * PIXEL_STD
    unit = box / (np.array(HEATMAP) - 1.0)
    return (joints - (centers - 0.5 * box)[:, None]) / unit[:, None]


def targets(coords: np.ndarray, sigma: float = 1.5) -> torch.Tensor:
    ys, xs = np.mgrid[0 : HEATMAP[1], 0 : HEATMAP[0]]
    d2 = (xs - coords[..., 0, None, None]) ** 2 + (ys - coords[..., 1, None, None]) ** 2
    return torch.from_numpy(np.exp(-d2 / (2 * sigma**2)).astype(np.float32))


# --- the model ---------------------------------------------------------------------------------

def train(folder: Path, steps: int, batch: int, seed: int, hard: float, pool: int) -> Path:
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation
    from transformers.models.vitpose.image_processing_pil_vitpose import VitPoseImageProcessorPil

    torch.manual_seed(seed)
    backbone = VitPoseBackboneConfig(image_size=[INPUT[1], INPUT[0]], patch_size=[16, 16], hidden_size=96,
                                     num_hidden_layers=4, num_attention_heads=4, mlp_ratio=4, out_indices=[4])
    config = VitPoseConfig(backbone_config=backbone, num_labels=17, scale_factor=4,
                           id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    model = VitPoseForPoseEstimation(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    all_crops, centers, scales, _, joints = crops_of(rng, pool, hard)
    all_coords = to_heatmap(joints, centers, scales)
    print(f"{pool} training instances drawn in {time.perf_counter() - started:.0f}s", flush=True)
    for step in range(steps):
        chosen = rng.choice(pool, batch, replace=False)
        crops, coords = all_crops[chosen], all_coords[chosen]
        flip = rng.random(batch) < 0.5  # mirror the crop, swap left and right
        crops[flip] = crops[flip][:, :, ::-1]
        coords[flip] = coords[flip][:, SWAP]
        coords[flip, :, 0] = HEATMAP[0] - 1 - coords[flip, :, 0]
        pixels = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - mean) / std
        loss = torch.nn.functional.mse_loss(model(pixel_values=pixels).heatmaps, targets(coords)) * 1000
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f}s", flush=True)
    path = folder / f"flip-doubt-vitpose-s{seed}-{steps}-{pool}"
    model.eval().save_pretrained(path, safe_serialization=True)
    VitPoseImageProcessorPil(size={"height": INPUT[1], "width": INPUT[0]}).save_pretrained(path)
    return path


# --- how well each ordering finds the wrong labels ---------------------------------------------

def auroc(doubt: np.ndarray, wrong: np.ndarray) -> float:
    """P(a wrong instance is doubted more than a right one), ties half (Mann-Whitney U)."""
    ranks = _ranks(doubt)
    n_wrong, n_right = wrong.sum(), (~wrong).sum()
    if not n_wrong or not n_right:
        return float("nan")
    return float((ranks[wrong].sum() - n_wrong * (n_wrong + 1) / 2) / (n_wrong * n_right))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def precision_at(doubt: np.ndarray, wrong: np.ndarray, fraction: float) -> float:
    k = max(1, int(round(fraction * len(doubt))))
    return float(wrong[np.argsort(-doubt, kind="stable")[:k]].mean())


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def evaluate(checkpoint: Path, n: int, seed: int, hard: float, wrong_below: float) -> dict:
    from raypose.models.vitpose import PoseEngine, inspect_model

    engine = PoseEngine(inspect_model(str(checkpoint)))
    crops, centers, scales, boxes, joints = crops_of(np.random.default_rng(seed + 10_000), n, hard)
    keypoints, scores, views = [], [], []
    for start in range(0, n, 64):
        part = slice(start, start + 64)
        submitted = engine.submit(crops[part], centers[part], scales[part], flip_pairs=COCO17.flip_pairs,
                                  flip_views=True)
        k, s = engine.collect(submitted)
        keypoints.append(k), scores.append(s), views.append(engine.collect_views(submitted))
    keypoints, scores, views = np.concatenate(keypoints), np.concatenate(scores), np.concatenate(views, axis=1)
    areas = boxes[:, 2] * boxes[:, 3]
    truth = flip_oks(keypoints, joints, areas, COCO17.sigmas)  # OKS of the label to the known joints
    wrong = truth < wrong_below
    instance = instance_scores(scores, np.full(n, np.nan))
    agreements = flip_agreements(views[0], views[1], areas, COCO17.sigmas)
    oks = agreements.mean(axis=1)
    errors = keypoint_flip_errors(views[0], views[1], scales, INPUT)
    orderings = {
        "1 - instance_score": 1 - instance,
        "1 - flip_oks": 1 - oks,
        "instance_doubt": instance_doubts(scores, agreements, np.full(n, np.nan)),
        "1 - instance_score x flip_oks": 1 - instance * oks,  # the first candidate, for comparison
        "mean keypoint_flip_error": errors.mean(axis=1),
    }
    confident = instance >= np.median(instance)

    resamples = [np.random.default_rng(i).integers(0, n, n) for i in range(200)]

    def table(mask: np.ndarray) -> dict:
        base = orderings["1 - instance_score"]
        return {name: {"auroc": auroc(d[mask], wrong[mask]), "precision_worst_10pct": precision_at(d[mask], wrong[mask], 0.1),
                       "precision_worst_20pct": precision_at(d[mask], wrong[mask], 0.2),
                       "spearman_with_1_minus_oks": spearman(d[mask], 1 - truth[mask]),
                       # a bootstrap over the instances: how sure the AUROC gain over instance_score is
                       "auroc_gain_95pct": list(np.percentile(
                           [auroc(d[r][mask[r]], wrong[r][mask[r]]) - auroc(base[r][mask[r]], wrong[r][mask[r]])
                            for r in resamples], [2.5, 97.5]))}
                for name, d in orderings.items()}

    return {
        "instances": n, "wrong": int(wrong.sum()), "mean_oks": float(truth.mean()),
        "all": table(np.ones(n, bool)),
        "high_score_half": {"instances": int(confident.sum()), "wrong": int(wrong[confident].sum()), **table(confident)},
    }


def decode_cost(batch: int, repeat: int) -> dict:
    """CPU ms per crop that `flip_views` adds to a flip-test forward of ViTPose's shape (256x192 crops, 17 64x48
    heatmaps): `PoseEngine.submit` with the network replaced by `synthetic.instant_heatmaps` (heatmaps at once),
    so all that is timed is normalizing, flipping back, averaging and decoding; best of `repeat`."""
    from raypose.models.vitpose import PoseEngine, inspect_model
    from raypose.testing.synthetic import instant_heatmaps, make_checkpoint

    folder = Path("bench-out/checkpoints/vitpose-tiny-flip-cost")
    if not (folder / "model.safetensors").exists():
        make_checkpoint(folder)
    engine = PoseEngine(inspect_model(str(folder)))
    engine.model = instant_heatmaps(engine.info)
    crops = np.random.default_rng(0).integers(0, 256, (batch, 256, 192, 3), dtype=np.uint8)
    centers, scales = center_scale_from_boxes(np.tile([[10.0, 10.0, 90.0, 160.0]], (batch, 1)), engine.info.input_size)
    timings = {}
    for name, views in (("flip test", False), ("flip test + flip_views", True)):
        best = math.inf
        for _ in range(repeat):
            started = time.process_time()
            submitted = engine.submit(crops, centers, scales, flip_pairs=COCO17.flip_pairs, flip_views=views)
            engine.collect(submitted), engine.collect_views(submitted)
            best = min(best, time.process_time() - started)
        timings[name] = 1000 * best / batch
    return {"batch": batch, "cpu_ms_per_crop": timings,
            "added_cpu_ms_per_crop": timings["flip test + flip_views"] - timings["flip test"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2500, help="training steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train", type=int, default=8000, help="training instances drawn")
    p.add_argument("--test", type=int, default=2000, help="test instances")
    p.add_argument("--hard", type=float, default=0.3, help="chance of each hard case (crowd, hidden head, block)")
    p.add_argument("--wrong", type=float, default=0.5, help="a label is wrong when its OKS to the truth is below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--json", default=None, help="default: OUT/flip_doubt.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / f"flip-doubt-vitpose-s{args.seed}-{args.steps}-{args.train}"
    if not (checkpoint / "model.safetensors").exists():
        checkpoint = train(folder, args.steps, args.batch, args.seed, args.hard, args.train)
    result = {"args": vars(args), **evaluate(checkpoint, args.test, args.seed, args.hard, args.wrong),
              "cost": decode_cost(8, 5)}
    cost = result["cost"]
    print(f"flip_views cost: {cost['cpu_ms_per_crop']} CPU ms per crop at batch 8 (all but the forward); "
          f"added {cost['added_cpu_ms_per_crop']:.2f} ms per crop")
    print(f"{result['instances']} test instances, {result['wrong']} wrong (OKS < {args.wrong}), "
          f"mean OKS {result['mean_oks']:.3f}")
    for part in ("all", "high_score_half"):
        rows = {k: v for k, v in result[part].items() if isinstance(v, dict)}
        print(f"\n{part}" + (f" ({result[part]['instances']} instances, {result[part]['wrong']} wrong)"
                            if part != "all" else ""))
        print(f"{'ordering':30s} {'AUROC':>7s} {'gain 95%':>16s} {'prec@10%':>9s} {'prec@20%':>9s} {'spearman':>9s}")
        for name, m in rows.items():
            low, high = m["auroc_gain_95pct"]
            print(f"{name:30s} {m['auroc']:7.3f} {f'[{low:+.3f}, {high:+.3f}]':>16s} {m['precision_worst_10pct']:9.3f} "
                  f"{m['precision_worst_20pct']:9.3f} {m['spearman_with_1_minus_oks']:9.3f}")
    Path(args.json or folder / "flip_doubt.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
