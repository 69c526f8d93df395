"""Hostile input, all of it, in one folder and one job: every file ends as keypoint rows or a specific error row.

The folder holds broken files, decompression bombs, every awkward image mode, animations,
EXIF rotation, a 1x1 image, awkward names, and a boxes file that lies (missing images, wrong
sizes, NaN, negative, zero, outside and partly outside boxes). The test spells out what must
become of each file and box (`expected_outcomes`) and compares the job's output with it exactly.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from helpers import job_dict, read_json
from PIL import Image
from typer.testing import CliRunner

from raypose.cli import app
from raypose.imaging.decode import decode_image

runner = CliRunner()
MAX_PIXELS = 1_000_000  # the job's images.max_pixels: a 1200x1000 PNG is a "bomb"
RED, BLUE = (220, 30, 30), (30, 30, 220)


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A noisy picture (so JPEGs have real scan data to truncate)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (Pillow refuses it at open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (64, 48), RED), Image.new("RGB", (64, 48), BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated() -> bytes:
    """Stored 64x48 with EXIF orientation 6 (rotate 90 degrees clockwise): displayed 48x64.

    The stored top-left quarter is red, so the displayed top-right corner is red.
    """
    image = Image.new("RGB", (64, 48), BLUE)
    image.paste(RED, (0, 0, 32, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def gray16() -> Image.Image:
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (48, 1))
    return Image.fromarray(ramp)  # mode I;16


def palette(transparent: bool = False) -> Image.Image:
    image = noise((64, 48), seed=2).quantize(16)
    if transparent:
        image.info["transparency"] = 0
    return image


def build_folder(folder: Path) -> dict:
    """Write the images; return the COCO boxes file (dict) that goes with them."""
    folder.mkdir(parents=True)
    good = encode(noise((96, 80)), "JPEG", quality=90)
    files = {
        "good.jpg": good,
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "not_an_image.jpg": b"<html><body>404 not found</body></html>\n",
        "bomb.png": encode(Image.new("RGB", (1200, 1000), "white"), "PNG"),  # 1.2 Mpx > images.max_pixels
        "pillow_bomb.png": png_declaring(20_000, 20_000),  # 400 Mpx: beyond Pillow's own limit
        "gray16.png": encode(gray16(), "PNG"),
        "palette.png": encode(palette(), "PNG"),
        "palette_transparent.png": encode(palette(transparent=True), "PNG", transparency=0),
        "cmyk.jpg": encode(noise((64, 48), "CMYK", seed=3), "JPEG"),
        "gray.jpg": encode(noise((64, 48), "L", seed=4), "JPEG"),
        "rgba.png": encode(noise((64, 48), "RGBA", seed=5), "PNG"),
        "animated.gif": animation("GIF"),
        "animated.webp": animation("WEBP"),
        "exif_rotated.jpg": exif_rotated(),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), RED), "PNG"),
        "UPPER CASE.JPG": encode(noise((64, 48), seed=6), "JPEG"),
        "person one.jpg": encode(noise((64, 48), seed=7), "JPEG"),
        "läufer_日本.png": encode(noise((64, 48), seed=8), "PNG"),
        "sub dir/ünïcode Ω.webp": encode(noise((64, 48), seed=9), "WEBP"),
        "wrong_size.jpg": encode(noise((64, 48), seed=10), "JPEG"),
        "boxes.jpg": encode(noise((120, 100), seed=11), "JPEG"),
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    nan, inf = float("nan"), float("inf")
    # (file name, size the boxes file claims, boxes)
    entries = [
        ("good.jpg", (96, 80), [[10, 10, 40, 60]]),
        ("empty.jpg", (96, 80), [[10, 10, 40, 60]]),
        ("truncated.jpg", (96, 80), [[10, 10, 40, 60]]),
        ("not_an_image.jpg", (96, 80), [[10, 10, 40, 60]]),
        ("bomb.png", (1200, 1000), [[10, 10, 40, 60]]),
        ("pillow_bomb.png", (20_000, 20_000), [[10, 10, 40, 60]]),
        ("gray16.png", (64, 48), [[4, 4, 30, 40]]),
        ("palette.png", (64, 48), [[4, 4, 30, 40]]),
        ("palette_transparent.png", (64, 48), [[4, 4, 30, 40]]),
        ("cmyk.jpg", (64, 48), [[4, 4, 30, 40]]),
        ("gray.jpg", (64, 48), [[4, 4, 30, 40]]),
        ("rgba.png", (64, 48), [[4, 4, 30, 40]]),
        ("animated.gif", (64, 48), [[4, 4, 30, 40]]),
        ("animated.webp", (64, 48), [[4, 4, 30, 40]]),
        # in the displayed orientation: y up to 60 is inside 48x64, outside the stored 64x48
        ("exif_rotated.jpg", (48, 64), [[4, 40, 30, 20]]),
        ("one_pixel.png", (1, 1), [[0, 0, 1, 1], [-2, -2, 10, 10]]),
        ("UPPER CASE.JPG", (64, 48), [[4, 4, 30, 40]]),
        ("person one.jpg", (64, 48), [[4, 4, 30, 40]]),
        ("läufer_日本.png", (64, 48), [[4, 4, 30, 40]]),
        ("sub dir/ünïcode Ω.webp", (64, 48), [[4, 4, 30, 40]]),
        ("missing.jpg", (64, 48), [[4, 4, 30, 40]]),  # in the boxes file, not in storage
        ("wrong_size.jpg", (640, 480), [[4, 4, 30, 40]]),
        ("boxes.jpg", (120, 100), [
            [10, 10, 40, 60],      # 0 fine
            [nan, 10, 20, 20],     # 1 NaN
            [None, 10, 20, 20],    # 2 null coordinate
            [10, 10, 20],          # 3 three numbers
            [0, 0, inf, 10],       # 4 infinite
            [10, 10, -5, 20],      # 5 negative width
            [10, 10, 20, 0],       # 6 zero height
            [500, 500, 10, 10],    # 7 fully outside
            [10, -50, 20, 20],     # 8 fully outside (above)
            [-20, -10, 50, 40],    # 9 partly outside: clipped to [0, 0, 30, 30]
            [100, 80, 50, 50],     # 10 partly outside: clipped to [100, 80, 20, 20]
            [5, 5, 0.5, 0.5],      # 11 inside, but less than a pixel
            [119.5, 10, 10, 10],   # 12 half a pixel of it inside
        ]),
    ]
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    for image_id, (name, (width, height), boxes) in enumerate(entries, start=1):
        coco["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})
        for index, box in enumerate(boxes):
            coco["annotations"].append(
                {"id": image_id * 100 + index, "image_id": image_id, "category_id": 1, "bbox": box, "iscrowd": 0}
            )
    return coco


def row(index: int, size: tuple[int, int], bbox: list[float]) -> tuple:
    return ("row", index, size, tuple(float(v) for v in bbox))


def error(index: int | None, stage: str, reason: str | re.Pattern) -> tuple:
    return ("error", index, stage, reason)


def expected_outcomes() -> dict[str, set[tuple]]:
    """What must become of every file (and every box) of the folder: keypoint rows or error rows."""
    decodes = {name: {row(0, (64, 48), [4, 4, 30, 40])} for name in (
        "gray16.png", "palette.png", "palette_transparent.png", "cmyk.jpg", "gray.jpg", "rgba.png",
        "animated.gif", "animated.webp", "UPPER CASE.JPG", "person one.jpg", "läufer_日本.png",
        "sub dir/ünïcode Ω.webp",
    )}
    return {
        "good.jpg": {row(0, (96, 80), [10, 10, 40, 60])},
        "empty.jpg": {error(None, "decode", "empty file (0 bytes)")},
        "truncated.jpg": {error(None, "decode", re.compile(
            r"corrupt or truncated image data: OSError: image file is truncated \(\d+ bytes not processed\)"))},
        "not_an_image.jpg": {error(None, "decode", "not an image Pillow can decode (unknown format)")},
        "bomb.png": {error(None, "decode", "1200x1000 = 1.2 Mpx is above images.max_pixels (1,000,000 pixels): "
                                          "refused as a possible decompression bomb")},
        "pillow_bomb.png": {error(None, "decode", re.compile(
            r"refused as a decompression bomb: Image size \(400000000 pixels\) exceeds limit of \d+ pixels.*"))},
        **decodes,
        "exif_rotated.jpg": {row(0, (48, 64), [4, 40, 30, 20])},
        "one_pixel.png": {row(0, (1, 1), [0, 0, 1, 1]), row(1, (1, 1), [0, 0, 1, 1])},
        "missing.jpg": {error(None, "list", "listed in the boxes file but not found under images.path")},
        "wrong_size.jpg": {error(None, "decode", "image is 64x48 but the boxes file says 640x480")},
        "boxes.jpg": {
            row(0, (120, 100), [10, 10, 40, 60]),
            error(1, "boxes", "box has a non-finite coordinate: [nan, 10.0, 20.0, 20.0]"),
            error(2, "boxes", "box has a non-finite coordinate: [nan, 10.0, 20.0, 20.0]"),
            error(3, "boxes", "box has a non-finite coordinate: [10.0, 10.0, 20.0, nan]"),
            error(4, "boxes", "box has a non-finite coordinate: [0.0, 0.0, inf, 10.0]"),
            error(5, "boxes", "box has zero or negative size: w=-5, h=20"),
            error(6, "boxes", "box has zero or negative size: w=20, h=0"),
            error(7, "boxes", "box [500.0, 500.0, 10.0, 10.0] lies outside the 120x100 image"),
            error(8, "boxes", "box [10.0, -50.0, 20.0, 20.0] lies outside the 120x100 image"),
            row(9, (120, 100), [0, 0, 30, 30]),
            row(10, (120, 100), [100, 80, 20, 20]),
            error(11, "boxes", "box [5.0, 5.0, 0.5, 0.5] covers less than a pixel of the 120x100 image"),
            error(12, "boxes", "box [119.5, 10.0, 10.0, 10.0] covers less than a pixel of the 120x100 image"),
        },
    }


def actual_outcomes(output: Path) -> tuple[dict[str, set[tuple]], list[dict]]:
    keypoints = pq.read_table(output / "keypoints").to_pylist()
    errors = pq.read_table(output / "errors").to_pylist()
    outcomes: dict[str, set[tuple]] = {}
    for r in keypoints:
        outcome = row(r["instance_index"], (r["image_width"], r["image_height"]), r["bbox"])
        outcomes.setdefault(r["image_key"], set()).add(outcome)
    for r in errors:
        outcomes.setdefault(r["image_key"], set()).add(error(r["instance_index"], r["stage"], r["reason"]))
    return outcomes, keypoints


def matches(actual: set[tuple], expected: set[tuple]) -> bool:
    """Exact comparison; an expected reason may be a regex that must match the whole reason."""
    if len(actual) != len(expected):
        return False
    remaining = list(actual)
    for want in expected:
        found = next((got for got in remaining if _same(got, want)), None)
        if found is None:
            return False
        remaining.remove(found)
    return True


def _same(got: tuple, want: tuple) -> bool:
    if got[:3] != want[:3]:
        return False
    if isinstance(want[3], re.Pattern):
        return isinstance(got[3], str) and want[3].fullmatch(got[3]) is not None
    return got[3] == want[3]


def test_every_hostile_file_ends_as_rows_or_a_specific_error(ray_session, tiny_checkpoint, write_job, tmp_path):
    images = tmp_path / "images"
    coco = build_folder(images)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(coco, ensure_ascii=False))  # NaN and Infinity as Python's json writes them
    output = tmp_path / "out"
    spec = job_dict(images, boxes, tiny_checkpoint, output, limits={"max_errored_fraction": 1.0},
                    resources={"images_per_crop_task": 4}, pose={"batch_size": 8})
    spec["images"]["max_pixels"] = MAX_PIXELS
    job = write_job(spec)
    result = runner.invoke(app, ["submit", str(job)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    actual, keypoints = actual_outcomes(output)
    expected = expected_outcomes()
    files = {str(p.relative_to(images)) for p in images.rglob("*") if p.is_file()}
    assert files | {"missing.jpg"} == set(expected)  # the table covers every file in the folder
    assert set(actual) == set(expected)
    wrong = {key: sorted(actual[key], key=str) for key in expected if not matches(actual[key], expected[key])}
    assert not wrong, f"unexpected outcomes: {wrong}"

    # Rows are real: finite keypoints, with the URI the image was read from.
    for r in keypoints:
        assert len(r["keypoint_x"]) == 17 and all(math.isfinite(v) for v in r["keypoint_x"] + r["keypoint_y"])
        assert r["image_uri"].endswith(r["image_key"])
    manifest = read_json(output / "manifest.json")
    errors = sum(1 for outcomes in expected.values() for o in outcomes if o[0] == "error")
    assert manifest["counts"]["instances"] == len(keypoints) == 19
    assert manifest["counts"]["errors"] == errors == 17


def test_hostile_files_decode_to_what_is_displayed(tmp_path):
    """The pixels behind the rows above: first frames, EXIF orientation, 16-bit scaling, alpha on white."""
    images = tmp_path / "images"
    build_folder(images)

    def decoded(name: str) -> np.ndarray:
        return np.asarray(decode_image((images / name).read_bytes(), MAX_PIXELS))

    for name in ("animated.gif", "animated.webp"):
        first = decoded(name)
        assert first.shape == (48, 64, 3)
        assert np.abs(first.astype(int) - RED).max() <= 8, name  # the first frame, not the last
    rotated = decoded("exif_rotated.jpg")
    assert rotated.shape == (64, 48, 3)  # displayed: 48 wide, 64 high
    assert np.abs(rotated[4, 44].astype(int) - RED).max() <= 16  # stored top-left is displayed top-right
    assert np.abs(rotated[60, 4].astype(int) - BLUE).max() <= 16
    ramp = decoded("gray16.png")
    assert ramp[0, 0].tolist() == [0, 0, 0] and ramp[0, -1].tolist() == [255, 255, 255]  # scaled, not clipped
    transparent = decoded("palette_transparent.png")
    index = np.asarray(Image.open(images / "palette_transparent.png"))
    assert (transparent[index == 0] == 255).all()  # transparent pixels composited on white
    for name in ("cmyk.jpg", "gray.jpg", "rgba.png", "palette.png", "one_pixel.png"):
        assert decoded(name).dtype == np.uint8 and decoded(name).shape[2] == 3
