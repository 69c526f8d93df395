"""The CLI: `raypose validate` / `raypose submit` exit 2 with one `error: ...` line for a bad job."""

from __future__ import annotations

import pytest
from conftest import job_dict
from typer.testing import CliRunner

from raypose.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture
def good_job(tiny_checkpoint, coco_folder, tmp_path):
    """A valid job dict over the shared tiny checkpoint and drawn COCO images."""
    return job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "out")


# --- version and help -----------------------------------------------------------------


# --- validate on a good job -----------------------------------------------------------


# --- bad specs: exit 2, one line naming the field ---------------------------------------


# --- --debug --------------------------------------------------------------------------


# --- submit stops before Ray ----------------------------------------------------------


@pytest.mark.parametrize(
    "breakage",
    [
        lambda job, tmp: job["pose"].update(batch_size=-1),
        lambda job, tmp: job["images"].update(path=str(tmp / "missing")),
        lambda job, tmp: (tmp / "out").mkdir() or (tmp / "out" / "manifest.json").write_text("{}"),
    ],
    ids=["spec", "images", "output"],
)
def test_submit_fails_before_starting_ray(breakage, good_job, write_job, tmp_path, monkeypatch):
    import ray

    was_running = ray.is_initialized()
    starts = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: starts.append((a, k)))
    breakage(good_job, tmp_path)
    result = invoke("submit", str(write_job(good_job)))
    assert result.exit_code == 2, result.output
    assert starts == []
    if not was_running:
        assert not ray.is_initialized()
