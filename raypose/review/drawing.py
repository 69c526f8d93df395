"""Drawing a job's instances on an image: boxes, labels, skeletons, a colour per instance, sides told apart."""

from __future__ import annotations

import colorsys
import re
from typing import Any

from PIL import Image, ImageDraw, ImageFont

THUMB_SIZE = 320
LABEL_PIXELS_IN_THUMB = 12  # a label's height in a thumbnail: readable at thumbnail size


def instance_colours(n: int) -> list[tuple[int, int, int]]:
    """n well-separated saturated colours, one per instance (golden-ratio hue steps, so neighbours differ)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.9, 1.0)) for i in range(n)]


def side_colour(colour: tuple[int, int, int], side: str) -> tuple[int, int, int]:
    """The instance's colour for a limb or keypoint: lighter on the left side, darker on the right."""
    if side == "left":
        return tuple(int(c + (255 - c) * 0.55) for c in colour)
    if side == "right":
        return tuple(int(c * 0.5) for c in colour)
    return colour


def keypoint_sides(names: list[str]) -> list[str]:
    """left, right or centre for each keypoint, from its name."""
    return ["left" if re.search(r"(^|_)(left|l)(_|$)", n.lower()) else
            "right" if re.search(r"(^|_)(right|r)(_|$)", n.lower()) else "centre" for n in names]


def draw_instances(image: Image.Image, rows: list[dict], schemas: dict[str, dict], threshold: float,
                   colours: list[tuple[int, int, int]]) -> int:
    """Draw boxes, labels, limbs and keypoints of `rows` on `image` in place, instance i in colours[i];
    return the keypoints drawn."""
    draw = ImageDraw.Draw(image)
    long_side = max(image.size)
    scale = max(1.0, long_side / THUMB_SIZE)  # image pixels per thumbnail pixel
    line = max(2, round(1.5 * scale))
    radius = line + 1
    font = _font(max(12, round(LABEL_PIXELS_IN_THUMB * scale)))
    drawn = 0
    for row, colour in zip(rows, colours):
        schema = schemas.get(row["keypoint_schema"]) or {}
        sides = keypoint_sides(schema.get("keypoints") or [])
        x, y, s = row["keypoint_x"] or [], row["keypoint_y"] or [], row["keypoint_score"] or []
        ok = [i < len(s) and s[i] is not None and s[i] > threshold and _finite(x[i], y[i]) for i in range(len(x))]
        bx, by, bw, bh = row["bbox"]
        draw.rectangle([bx, by, bx + bw, by + bh], outline=(0, 0, 0), width=line + 2)
        draw.rectangle([bx, by, bx + bw, by + bh], outline=colour, width=line)
        for a, b in schema.get("skeleton") or []:
            if a < len(ok) and b < len(ok) and ok[a] and ok[b]:
                side = sides[a] if a < len(sides) and sides[a] == (sides[b] if b < len(sides) else None) else "centre"
                draw.line([(x[a], y[a]), (x[b], y[b])], fill=(0, 0, 0), width=line + 2)
                draw.line([(x[a], y[a]), (x[b], y[b])], fill=side_colour(colour, side), width=line)
        for i, visible in enumerate(ok):
            if visible:
                fill = side_colour(colour, sides[i] if i < len(sides) else "centre")
                draw.ellipse([x[i] - radius, y[i] - radius, x[i] + radius, y[i] + radius], fill=fill, outline=(0, 0, 0))
                drawn += 1
        _label(draw, row, colour, font, (bx, by, bw, bh), image.size)
    return drawn


def _label(draw: ImageDraw.ImageDraw, row: dict, colour, font, box, size) -> None:
    """`#index score` on a patch of the instance's colour just above its box (inside it at the image's top)."""
    score = row["instance_score"]
    text = f"#{row['instance_index']} {score:.2f}" if score is not None else f"#{row['instance_index']}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 6, bottom - top + 6
    bx, by = box[0], box[1]
    x = min(max(0, bx), max(0, size[0] - width))
    y = by - height if by - height >= 0 else by
    draw.rectangle([x, y, x + width, y + height], fill=colour, outline=(0, 0, 0))
    draw.text((x + 3 - left, y + 3 - top), text, fill=(0, 0, 0), font=font)


def _finite(*values: Any) -> bool:
    return all(v is not None and v == v and abs(v) != float("inf") for v in values)


_FONTS: dict[int, Any] = {}


def _font(size: int):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has one bitmap size
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]
