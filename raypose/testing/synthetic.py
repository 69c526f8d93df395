"""Synthetic inputs: drawn people with COCO boxes, and ViTPose checkpoints of known shapes.

Used by the tests, the benchmark and the bundled quickstart, so none of them needs the
network. Random weights produce meaningless keypoints; the shapes and code paths are real.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Backbone shapes of the published checkpoints (usyd-community/vitpose-*), plus a tiny one.
PRESETS: dict[str, dict] = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2},
    # The quickstart's trained checkpoint (benchmarks/train_quickstart.py): small enough to train on a laptop's CPU.
    "tiny-trained": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "mlp_ratio": 2},
    "tiny-plus": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2,
        "num_experts": 6, "part_features": 8,
    },
    "vitpose-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4},
    "vitpose-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4},
    "vitpose-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4},
    "vitpose-huge": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16, "mlp_ratio": 4},
    "vitpose-plus-base": {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
        "num_experts": 6, "part_features": 192,
    },
}


def make_checkpoint(
    path: str | Path,
    preset: str = "tiny",
    num_keypoints: int = 17,
    image_size: tuple[int, int] = (256, 192),
    seed: int = 0,
) -> Path:
    """Save a randomly initialised ViTPose checkpoint (safetensors + processor config) to `path`."""
    import torch
    from transformers import (
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
    )
    from transformers.models.vitpose.image_processing_pil_vitpose import (
        VitPoseImageProcessorPil,
    )

    shape = PRESETS[preset]
    backbone = VitPoseBackboneConfig(
        image_size=list(image_size),
        patch_size=[16, 16],
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        mlp_ratio=shape["mlp_ratio"],
        num_experts=shape.get("num_experts", 1),
        part_features=shape.get("part_features", 256),
        out_indices=[shape["num_hidden_layers"]],
    )
    config = VitPoseConfig(
        backbone_config=backbone,
        num_labels=num_keypoints,
        id2label={i: f"keypoint_{i}" for i in range(num_keypoints)},
        label2id={f"keypoint_{i}": i for i in range(num_keypoints)},
    )
    torch.manual_seed(seed)
    model = VitPoseForPoseEstimation(config).eval()
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    VitPoseImageProcessorPil(size={"height": image_size[0], "width": image_size[1]}).save_pretrained(path)
    return path


def draw_people(width: int, height: int, boxes: np.ndarray, seed: int = 0) -> Image.Image:
    """An RGB picture with a textured background and a stick figure inside each xywh box."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), ((xx + yy) * 127 // max(width + height, 1))],
        axis=-1,
    ).astype(np.uint8)
    noise = rng.integers(0, 24, size=base.shape, dtype=np.uint8)
    image = Image.fromarray(base // 2 + noise)
    _draw_stick_figures(image, boxes, rng)
    return image


def _draw_stick_figures(image: Image.Image, boxes: np.ndarray, rng: np.random.Generator) -> None:
    """A stick figure (head, spine, arms, legs) inside each xywh box, in a random light colour."""
    draw = ImageDraw.Draw(image)
    for x, y, w, h in boxes:
        color = tuple(int(c) for c in rng.integers(80, 256, size=3))
        cx, line = x + w / 2, max(1, int(min(w, h) / 12))
        head = h * 0.1
        draw.ellipse([cx - head, y, cx + head, y + 2 * head], outline=color, width=line)
        neck, hip = (cx, y + 2 * head), (cx, y + 0.55 * h)
        draw.line([neck, hip], fill=color, width=line)
        draw.line([(x + 0.1 * w, y + 0.3 * h), (cx, y + 0.25 * h), (x + 0.9 * w, y + 0.3 * h)], fill=color, width=line)
        draw.line([(x + 0.2 * w, y + h), hip, (x + 0.8 * w, y + h)], fill=color, width=line)


def figure_keypoints(bbox: list[float]) -> list[float]:
    """COCO-17 joints `[x, y, 2] * 17` of the stick figure `draw_people` draws in `bbox` (facing the camera).

    The face's and knees' joints are where a figure's proportions put them (the head is a circle, the legs
    straight); the others are the drawn lines' ends and bends.
    """
    x, y, w, h = bbox
    cx = x + w / 2
    joints = {
        "nose": (cx, y + 0.10 * h),
        "left_eye": (cx + 0.03 * w, y + 0.08 * h), "right_eye": (cx - 0.03 * w, y + 0.08 * h),
        "left_ear": (cx + 0.08 * w, y + 0.10 * h), "right_ear": (cx - 0.08 * w, y + 0.10 * h),
        "left_shoulder": (cx + 0.15 * w, y + 0.26 * h), "right_shoulder": (cx - 0.15 * w, y + 0.26 * h),
        "left_elbow": (cx + 0.28 * w, y + 0.28 * h), "right_elbow": (cx - 0.28 * w, y + 0.28 * h),
        "left_wrist": (x + 0.9 * w, y + 0.30 * h), "right_wrist": (x + 0.1 * w, y + 0.30 * h),
        "left_hip": (cx + 0.05 * w, y + 0.55 * h), "right_hip": (cx - 0.05 * w, y + 0.55 * h),
        "left_knee": (cx + 0.15 * w, y + 0.77 * h), "right_knee": (cx - 0.15 * w, y + 0.77 * h),
        "left_ankle": (x + 0.8 * w, y + 0.99 * h), "right_ankle": (x + 0.2 * w, y + 0.99 * h),
    }  # fmt: skip
    flat: list[float] = []
    from raypose.imaging.keypoint_schemas import COCO17

    for name in COCO17.keypoints:
        px, py = joints[name]
        flat += [round(px, 2), round(py, 2), 2]
    return flat


def make_coco_dataset(
    folder: str | Path,
    sizes: list[tuple[int, int]],
    persons_per_image: list[int] | int = 2,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write JPEGs with drawn people under `folder/images/` and `folder/boxes.json` (COCO); return the JSON path."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    counts = persons_per_image if isinstance(persons_per_image, list) else [persons_per_image] * len(sizes)
    images, annotations = [], []
    for index, ((width, height), count) in enumerate(zip(sizes, counts)):
        boxes = []
        for _ in range(count):
            h = rng.uniform(0.3, 0.8) * height
            w = h * rng.uniform(0.3, 0.6)
            w = min(w, width * 0.9)
            boxes.append([float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), float(w), float(h)])
        name = f"img_{index:04d}.jpg"
        draw_people(width, height, np.array(boxes).reshape(-1, 4), seed=seed + index).save(
            folder / "images" / name, quality=quality
        )
        images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
        annotations += [_person_annotation(len(annotations) + i + 1, index + 1, box) for i, box in enumerate(boxes)]
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    path = folder / "boxes.json"
    path.write_text(json.dumps(coco, indent=1))
    return path


def _person_annotation(annotation_id: int, image_id: int, box: list[float]) -> dict:
    """A COCO person annotation for an xywh box."""
    return {
        "id": annotation_id, "image_id": image_id, "category_id": 1, "bbox": [round(v, 2) for v in box],
        "area": round(box[2] * box[3], 2), "iscrowd": 0,
    }


def make_quickstart(folder: str | Path) -> None:
    """(Re)build the bundled quickstart's data: four drawn JPEGs, their COCO boxes, and the same as Parquet rows
    (an `image` struct {bytes, path} and a `bbox` list, as Hugging Face datasets export them). Its checkpoint,
    `vitpose-tiny`, is trained by benchmarks/train_quickstart.py."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    make_coco_dataset(folder, [(640, 480), (480, 640), (800, 450), (512, 512)], persons_per_image=[2, 1, 3, 2], seed=7)
    coco = json.loads((folder / "boxes.json").read_text())
    boxes: dict[int, list] = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        boxes[annotation["image_id"]].append(annotation["bbox"])
    pq.write_table(pa.table({
        "image": [{"bytes": (folder / "images" / image["file_name"]).read_bytes(), "path": image["file_name"]}
                  for image in coco["images"]],
        "bbox": [boxes[image["id"]] for image in coco["images"]],
    }), folder / "rows.parquet")


BENCHMARK_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1280, 720), (4000, 3000))


def make_benchmark_dataset(
    folder: str | Path,
    count: int,
    sizes: tuple[tuple[int, int], ...] | list[tuple[int, int]] = BENCHMARK_SIZES,
    persons: tuple[int, int] = (1, 8),
    box_heights: tuple[float, float] = (0.3, 0.8),
    seed: int = 0,
    quality: int = 90,
    workers: int = 1,
) -> tuple[Path, Path]:
    """Benchmark inputs: `count` JPEGs under `folder/images/`, a manifest and COCO boxes for them.

    Image i has size `sizes[i % len(sizes)]` and 1..8 people (by default) drawn from a
    generator seeded with (seed, i), so the first n images of a larger set are the same
    images with the same boxes: `count` can grow without redrawing, and runs at N and 4N
    share their first N inputs. Images already on disk are kept. Person heights are a
    fraction `box_heights` of the image height, as in `make_coco_dataset`.

    Returns (manifest, boxes): `folder/images-{count}.txt` (one `images/NAME` per line, the
    image keys) and `folder/boxes-{count}.json` (COCO, file_name = key). `workers` > 1 draws
    the missing pictures in that many processes (each image is seeded on its own: same files).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, keys, to_draw = [], [], [], []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        rng = np.random.default_rng([seed, index])
        boxes = []
        for _ in range(int(rng.integers(persons[0], persons[1] + 1))):
            h = rng.uniform(*box_heights) * height
            w = min(h * rng.uniform(0.3, 0.6), width * 0.9)
            boxes.append([float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), float(w), float(h)])
        key = f"images/img_{index:05d}_{width}x{height}.jpg"
        if not (folder / key).exists():
            to_draw.append((folder / key, width, height, boxes, seed * 100_003 + index, quality))
        keys.append(key)
        images.append({"id": index + 1, "file_name": key, "width": width, "height": height})
        annotations += [_person_annotation(len(annotations) + i + 1, index + 1, box) for i, box in enumerate(boxes)]
    if workers > 1 and len(to_draw) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_draw_jpeg, to_draw, chunksize=4))
    else:
        for job in to_draw:
            _draw_jpeg(job)
    manifest = folder / f"images-{count}.txt"
    manifest.write_text("".join(f"{key}\n" for key in keys))
    boxes_path = folder / f"boxes-{count}.json"
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    boxes_path.write_text(json.dumps(coco))
    return manifest, boxes_path


def _draw_jpeg(job: tuple) -> None:
    path, width, height, boxes, seed, quality = job
    partial = path.with_suffix(".part")
    draw_scene(width, height, np.array(boxes).reshape(-1, 4), seed=seed).save(partial, format="JPEG", quality=quality)
    partial.replace(path)


def draw_scene(width: int, height: int, boxes: np.ndarray, seed: int = 0) -> Image.Image:
    """`draw_people`'s kind of picture, built fast enough for 12-megapixel benchmark images.

    The same gradient background with grain (a tiled 256x256 noise patch, which a JPEG
    decoder cannot tell from fresh noise) and the same stick figures; ~0.3 s at 4000x3000
    where `draw_people` takes seconds.
    """
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.uint32)
    y = np.arange(height, dtype=np.uint32)[:, None]
    base = np.empty((height, width, 3), np.uint8)
    base[..., 0] = (x * 255 // max(width - 1, 1) // 2).astype(np.uint8)
    base[..., 1] = (y * 255 // max(height - 1, 1) // 2).astype(np.uint8)
    base[..., 2] = ((x + y) * 127 // max(width + height, 1) // 2).astype(np.uint8)
    patch = rng.integers(0, 24, size=(256, 256, 3), dtype=np.uint8)
    reps = (-(-height // 256), -(-width // 256), 1)
    base += np.tile(patch, reps)[:height, :width]
    image = Image.fromarray(base)
    _draw_stick_figures(image, boxes, rng)
    return image


def make_detector_checkpoint(path: str | Path, labels: list[str], image_size: int = 320, seed: int = 0) -> Path:
    """Save a tiny randomly initialised RT-DETR (safetensors + its image processor) to `path`.

    Its scores are near the focal-loss prior (~0.01): use a low threshold to get boxes.
    """
    import torch
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig
    from transformers.models.rt_detr.image_processing_pil_rt_detr import (
        RTDetrImageProcessorPil,
    )

    backbone = RTDetrResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = RTDetrConfig(
        backbone_config=backbone, encoder_hidden_dim=32, encoder_in_channels=[32, 64, 128], d_model=32,
        encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2,
        encoder_attention_heads=2, num_queries=30, num_feature_levels=3, decoder_in_channels=[32, 32, 32],
        num_denoising=0, id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    path = Path(path)
    RTDetrForObjectDetection(config).eval().save_pretrained(path, safe_serialization=True)
    RTDetrImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def instant_heatmaps(info):
    """A stand-in for a ViTPose model (`PoseEngine.model`): zero heatmaps of its output shape, at once.

    With it a pose actor does all its own work but the forward: the host's limit, measurable on any CPU.
    """
    import types

    import torch

    shape = (info.num_keypoints, info.input_size[1] // 4, info.input_size[0] // 4)

    class InstantHeatmaps(torch.nn.Module):
        def forward(self, pixel_values, **_):
            return types.SimpleNamespace(heatmaps=pixel_values.new_zeros((pixel_values.shape[0], *shape)))

    return InstantHeatmaps()


def make_video(path: str | Path, frames: int = 12, size: tuple[int, int] = (128, 96), codec: str = "libx264",
               fps: int = 10, variable: bool = False, rotation: int = 0, people: int = 2, seed: int = 0,
               grain: bool = False, bit_rate: int | None = None) -> list[list]:
    """Write a video of `people` stick figures walking across a drawn background (PyAV); return each frame's
    boxes (xywh, in the frame as a player shows it). `variable`: frames 1, 2 and 3 tenths of a second apart
    in turn; `rotation`: a display matrix turning the picture that many degrees counterclockwise; `grain`: the
    background's noise new in every frame, and `bit_rate` (bits/s), for a decoder's work like a camera's."""
    import av

    width, height = size
    rng = np.random.default_rng(seed)
    start = rng.uniform(0, 0.5, (people, 2)) * np.array([width, height])
    step = rng.uniform(-3, 3, (people, 2))
    shape = np.array([0.25 * width, 0.6 * height])
    turns = round(rotation / 90) % 4
    boxes = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        # Stored turned back, so that a player (and raypose) shows the drawn picture upright.
        stream.width, stream.height = (height, width) if turns % 2 else (width, height)
        stream.pix_fmt = "yuv420p"
        if bit_rate:
            stream.bit_rate = bit_rate
        if variable:
            stream.codec_context.time_base = Fraction(1, 1000)
        if turns:
            stream.set_display_rotation(rotation)
        pts = 0
        for index in range(frames):
            xy = np.clip(start + index * step, 0, np.array([width, height]) - shape)
            frame_boxes = np.concatenate([xy, np.broadcast_to(shape, xy.shape)], axis=1).round(1)
            boxes.append(frame_boxes.tolist())
            drawn = draw_people(width, height, frame_boxes, seed=seed + index if grain else seed)
            picture = np.rot90(np.asarray(drawn), -turns)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            if variable:
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                pts += 100 * (1 + index % 3)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return boxes
