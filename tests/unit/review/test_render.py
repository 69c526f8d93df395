"""`raypose render`'s file names: safe inside the output folder, never colliding."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from raypose.cli import app
from raypose.review.render import safe_name, unique_names

runner = CliRunner()
SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def render(*args):
    return runner.invoke(app, ["render", *map(str, args)])


@pytest.mark.parametrize(
    "key",
    ["../../etc/passwd", "/abs/path.jpg", "..", ".hidden.jpg", "a/b/../../c.jpg", "név ü 图像.JPG", "x" * 300 + ".png",
     "con<>:\"|?*.jpg", "", "a\\b\\c.jpg", "line\nbreak.jpg"],
)
def test_safe_names_stay_inside_the_output_folder(key, tmp_path):
    name = safe_name(key)
    assert SAFE.match(name) and not name.startswith(".") and len(name) <= 100
    assert (tmp_path / "images" / f"{name}.jpg").resolve().parent == (tmp_path / "images").resolve()


def test_unique_names_never_collide():
    keys = ["a b.jpg", "a_b.jpg", "a?b.jpg", "A B.jpg", "dir/a b.jpg", "dir__a b.jpg"]
    names = unique_names(keys)
    assert len({n.lower() for n in names.values()}) == len(keys)
    assert all(SAFE.match(n) for n in names.values())
