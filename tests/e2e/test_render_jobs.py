"""`raypose render` on a real output: skeletons drawn on sampled images, an index.html grid, fsspec URLs."""

from __future__ import annotations

import html
import re

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from job_output import NESTED_KEY, shared_job
from PIL import Image, ImageOps
from typer.testing import CliRunner

from raypose.cli import app
from raypose.imaging.keypoint_schemas import COCO17

runner = CliRunner()
SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory, coco_folder, tiny_checkpoint):
    return shared_job(tmp_path_factory, coco_folder, tiny_checkpoint)


def render(*args):
    return runner.invoke(app, ["render", *map(str, args)])


def rendered_files(index_html: str) -> dict[str, str]:
    """image key -> full-size picture, in the order index.html shows them (each card links its own page)."""
    pairs = re.findall(r'<a href="view/([^"]+)\.html"><img src="thumbs/([^"]+)" alt="([^"]*)"', index_html)
    assert all(f"{page}.jpg" == thumb for page, thumb, _ in pairs)
    return {html.unescape(alt): f"images/{thumb}" for _, thumb, alt in pairs}


def original(job, key: str) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(job.images / key)).convert("RGB"), dtype=np.int32)


def neighbourhood_diff(a: np.ndarray, b: np.ndarray, x: float, y: float, r: int = 2) -> int:
    """The largest per-pixel difference (summed over RGB) within r px of (x, y)."""
    xi, yi = int(round(x)), int(round(y))
    window = np.s_[max(yi - r, 0): yi + r + 1, max(xi - r, 0): xi + r + 1]
    return int(np.abs(a[window] - b[window]).sum(axis=-1).max())


def far_from_boxes(x: float, y: float, boxes: list, margin: float = 8) -> bool:
    """Not on any box outline, nor in the label at a box's top-left corner."""
    for bx, by, bw, bh in boxes:
        near_edge = (
            (abs(x - bx) < margin or abs(x - bx - bw) < margin) and by - margin < y < by + bh + margin
        ) or ((abs(y - by) < margin or abs(y - by - bh) < margin) and bx - margin < x < bx + bw + margin)
        in_label = bx - margin <= x <= bx + 120 and by - 30 <= y <= by + 30
        if near_edge or in_label:
            return False
    return True


def test_render_draws_limbs_and_lists_every_picture(job, tmp_path):
    out = tmp_path / "qa"
    result = render(job.output, "--out", out, "--sample", 50, "--keypoint-threshold", 0)
    assert result.exit_code == 0, result.output
    assert "rendered: 4 of 4 chosen images" in result.stdout

    rows = pq.read_table(job.output / "keypoints").to_pylist()
    keys = sorted({r["image_key"] for r in rows})
    page = (out / "index.html").read_text()
    files = rendered_files(page)
    # index.html lists every rendered picture, and every picture on disk is in it
    assert sorted(files) == keys
    assert sorted(f"images/{p.name}" for p in (out / "images").iterdir()) == sorted(files.values())
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == sorted(v.split("/")[1] for v in files.values())
    for key in keys:
        n = sum(r["image_key"] == key for r in rows)
        caption = page.split(html.escape(key), 1)[1].split("</figure>")[0]
        assert f">{n} instance{'s' if n != 1 else ''}</span>" in caption
    # file names are sanitized: no spaces, parentheses or folders, even for "nested dir/odd name (1).jpg"
    assert all(SAFE.match(p.name) for p in (out / "images").iterdir())
    assert files[NESTED_KEY].startswith("images/nested_dir__odd_name_1-")
    assert {p.name for p in out.iterdir()} == {"images", "thumbs", "view", "index.html"}

    # pixels changed along a known limb: left_shoulder -> left_elbow of a person, both scored above 0
    candidates = []
    for row in rows:
        if row["keypoint_schema"] != "coco17":
            continue
        a, b = (COCO17.keypoints.index(n) for n in ("left_shoulder", "left_elbow"))
        assert [a, b] in [list(e) for e in COCO17.skeleton]
        xa, ya, xb, yb = row["keypoint_x"][a], row["keypoint_y"][a], row["keypoint_x"][b], row["keypoint_y"][b]
        mx, my = (xa + xb) / 2, (ya + yb) / 2
        inside = 3 <= mx < row["image_width"] - 3 and 3 <= my < row["image_height"] - 3
        if row["keypoint_score"][a] > 0 and row["keypoint_score"][b] > 0 and inside and np.hypot(xb - xa, yb - ya) > 12:
            boxes = [r["bbox"] for r in rows if r["image_key"] == row["image_key"]]
            candidates.append((not far_from_boxes(mx, my, boxes), row["image_key"], mx, my))
    assert candidates, "no person row has a drawable left upper arm"
    _, key, mx, my = sorted(candidates)[0]  # prefer a midpoint away from box outlines and labels
    drawn = np.asarray(Image.open(out / files[key]).convert("RGB"), dtype=np.int32)
    before = original(job, key)
    assert drawn.shape == before.shape
    assert neighbourhood_diff(drawn, before, mx, my) > 120

    # control: with a threshold above every score nothing but the boxes is drawn
    control = tmp_path / "control"
    result = render(job.output, "--out", control, "--keypoint-threshold", 10)
    assert result.exit_code == 0, result.output
    page = (control / "index.html").read_text()
    assert page.count(">0 keypoints drawn<") == len(keys)
    if far_from_boxes(mx, my, [r["bbox"] for r in rows if r["image_key"] == key]):
        undrawn = np.asarray(Image.open(control / rendered_files(page)[key]).convert("RGB"), dtype=np.int32)
        assert neighbourhood_diff(undrawn, before, mx, my) < 60  # JPEG noise only


def test_sample_seed_and_images_override(job, tmp_path):
    one = render(job.output, "--out", tmp_path / "a", "--sample", 2, "--order", "random", "--seed", 3)
    two = render(job.output, "--out", tmp_path / "b", "--sample", 2, "--order", "random", "--seed", 3)
    assert one.exit_code == two.exit_code == 0
    picked = sorted(rendered_files((tmp_path / "a" / "index.html").read_text()))
    assert len(picked) == 2 and picked == sorted(rendered_files((tmp_path / "b" / "index.html").read_text()))

    # --images: the same keys under another root (black pictures), one of them missing
    moved = tmp_path / "moved"
    for path in job.images.rglob("*.jpg"):
        if path.stat().st_size:
            target = moved / path.relative_to(job.images)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", Image.open(path).size).save(target)
    (moved / "img_0000.jpg").unlink()
    result = render(job.output, "--out", tmp_path / "c", "--images", moved, "--keypoint-threshold", 10)
    assert result.exit_code == 0, result.output
    assert "rendered: 3 of 4" in result.stdout
    assert "img_0000.jpg: read: not found in storage" in result.stderr
    page = (tmp_path / "c" / "index.html").read_text()
    assert "not rendered" in page and "not found in storage" in page
    files = rendered_files(page)
    assert "img_0000.jpg" not in files
    black = np.asarray(Image.open(tmp_path / "c" / files["img_0001.jpg"]).convert("L"), dtype=float)
    assert black.mean() < 0.5 * original(job, "img_0001.jpg").mean()


def test_the_qa_page_shows_worst_first_filters_and_lists_the_failed_images(job, tmp_path):
    rows = pq.read_table(job.output / "keypoints").to_pylist()
    lowest = {}
    for row in rows:
        lowest[row["image_key"]] = min(lowest.get(row["image_key"], 2.0), row["instance_score"])
    out = tmp_path / "qa"
    assert render(job.output, "--out", out).exit_code == 0
    page = (out / "index.html").read_text()
    assert list(rendered_files(page)) == sorted(lowest, key=lambda k: (lowest[k], k))  # worst first
    assert "break-all" not in page and "overflow-wrap: anywhere" in page  # numbers are never broken mid-token
    assert "left side (lighter)" in page and "right side (darker)" in page  # the legend
    failed = page.split("<h2>Failed images", 1)[1]
    errors = pq.read_table(job.output / "errors").to_pylist()
    whole = [e for e in errors if e["instance_index"] is None]
    assert whole and all(html.escape(e["image_key"]) in failed and html.escape(e["reason"]) in failed for e in whole)
    # Each card's page: the picture at full size and its instances.
    first = next(iter(rendered_files(page)))
    view = next(p for p in (out / "view").iterdir() if html.escape(first) in p.read_text())
    text = view.read_text()
    assert 'href="../index.html"' in text and text.count("<tr><td>") == sum(r["image_key"] == first for r in rows)

    best = render(job.output, "--out", tmp_path / "best", "--order", "best", "--sample", 1)
    assert best.exit_code == 0
    highest = max(lowest, key=lambda k: (max(r["instance_score"] for r in rows if r["image_key"] == k), k))
    assert list(rendered_files((tmp_path / "best" / "index.html").read_text())) == [highest]
    assert render(job.output, "--out", tmp_path / "dogs", "--expert", "ap10k").exit_code == 0
    assert list(rendered_files((tmp_path / "dogs" / "index.html").read_text())) == sorted(
        {r["image_key"] for r in rows if r["expert"] == "ap10k"})
    cutoff = sorted(lowest.values())[1]
    assert render(job.output, "--out", tmp_path / "low", "--max-score", cutoff).exit_code == 0
    assert set(rendered_files((tmp_path / "low" / "index.html").read_text())) == {
        r["image_key"] for r in rows if r["instance_score"] <= cutoff}
    assert render(job.output, "--out", tmp_path / "x", "--order", "sideways").exit_code == 2


def test_render_reads_and_writes_fsspec_urls(job):
    fs = fsspec.filesystem("memory")
    fs.put(str(job.output), "/render-test/out", recursive=True)
    try:
        result = render("memory://render-test/out", "--out", "memory://render-test/qa", "--sample", 1)
        assert result.exit_code == 0, result.output
        page = fs.cat_file("/render-test/qa/index.html").decode()
        [(key, href)] = rendered_files(page).items()
        assert fs.exists(f"/render-test/qa/{href}")
    finally:
        fs.rm("/render-test", recursive=True)


def test_render_refuses_what_is_not_an_output(tmp_path):
    result = render(tmp_path, "--out", tmp_path / "qa")
    assert result.exit_code == 2 and "not a raypose output" in result.stderr
    result = render(tmp_path, "--out", tmp_path / "qa", "--sample", 0)
    assert result.exit_code == 2 and "--sample" in result.stderr


