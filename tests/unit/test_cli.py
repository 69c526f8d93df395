"""The CLI without Ray: `raypose validate` / `raypose submit` exit 2 with one `error: ...` line for a bad job."""

from __future__ import annotations

import json
import re
import time
import traceback

import pytest
from helpers import job_dict
from typer.testing import CliRunner

from raypose import __version__
from raypose.cli import app
from raypose.errors import SpecError

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture
def good_job(tiny_checkpoint, coco_folder, tmp_path):
    """A valid job dict over the shared tiny checkpoint and drawn COCO images."""
    return job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "out")


def one_error_line(result, *fragments: str) -> str:
    """Assert exit code 2 and a single `error: ...` line naming `fragments`; return that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# --- version and help -----------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"raypose {__version__}"
    assert re.fullmatch(r"raypose \d+\.\d+\.\d+\S*", result.stdout.strip())


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("validate", "submit", "--version"):
        assert word in result.stdout


def test_no_arguments_shows_help():
    result = invoke()
    assert "validate" in result.output and "submit" in result.output


@pytest.mark.parametrize("command", ["submit", "validate"])
def test_command_help_mentions_set(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "--set" in result.stdout
    assert "pose.batch_size=64" in result.stdout
    assert "--debug" in result.stdout


# --- validate on a good job -----------------------------------------------------------


def test_validate_good_job(good_job, write_job, tiny_checkpoint, tmp_path):
    result = invoke("validate", str(write_job(good_job)))
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith("ok: 3 images (3 with boxes, 0 without), 6 boxes"), line
    assert f"expert coco: {tiny_checkpoint}" in line
    assert "17 keypoints, input 192x256" in line
    assert f"output {tmp_path / 'out'}" in line
    assert not (tmp_path / "out").exists()  # validate writes nothing


def test_validate_applies_set(good_job, write_job):
    path = write_job(good_job)
    assert invoke("validate", str(path), "--set", "pose.batch_size=64").exit_code == 0
    result = invoke("validate", str(path), "--set", "pose.batch_size=0", "--set", "name=ok-name")
    one_error_line(result, "pose.batch_size: expected a positive integer, got 0")


# --- bad specs: exit 2, one line naming the field ---------------------------------------


@pytest.mark.parametrize("command", ["validate", "submit"])
def test_bad_batch_size(command, good_job, write_job):
    good_job["pose"]["batch_size"] = "abc"
    one_error_line(invoke(command, str(write_job(good_job))), 'pose.batch_size: expected a positive integer, got "abc"')


@pytest.mark.parametrize("command", ["validate", "submit"])
def test_unknown_key(command, good_job, write_job):
    good_job["pose"]["batchsize"] = 8
    one_error_line(invoke(command, str(write_job(good_job))), "pose.batchsize: unknown key", "'batch_size'")


def test_several_problems_are_all_printed(good_job, write_job):
    good_job["pose"]["batch_size"] = "abc"
    good_job["output"]["mode"] = "sometimes"
    result = invoke("validate", str(write_job(good_job)))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid job spec:")
    assert "pose.batch_size:" in result.stderr and "output.mode:" in result.stderr


def test_missing_job_file(tmp_path):
    one_error_line(invoke("validate", str(tmp_path / "nope.yaml")), "nope.yaml", "cannot read the job file")


def test_bad_override(good_job, write_job):
    one_error_line(invoke("validate", str(write_job(good_job)), "--set", "nokey"), "--set 'nokey'", "dotted.key=value")


@pytest.mark.parametrize("command", ["validate", "submit"])
def test_missing_images_dir(command, good_job, write_job, tmp_path):
    good_job["images"]["path"] = str(tmp_path / "no-images")
    one_error_line(invoke(command, str(write_job(good_job))), "images.path:", "no-images")


def test_missing_boxes_file(good_job, write_job, tmp_path):
    good_job["boxes"]["path"] = str(tmp_path / "no-boxes.json")
    one_error_line(invoke("validate", str(write_job(good_job))), "boxes.path:", "no-boxes.json", "does not exist")


def test_boxes_that_match_no_image(good_job, write_job, tmp_path):
    boxes = tmp_path / "boxes.json"
    coco = {
        "images": [{"id": 1, "file_name": "elsewhere/photo.jpg", "width": 320, "height": 240}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 100], "area": 5000, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "person"}],
    }
    boxes.write_text(json.dumps(coco))
    good_job["boxes"]["path"] = str(boxes)
    one_error_line(invoke("validate", str(write_job(good_job))), "boxes.path:", "elsewhere/photo.jpg")


def test_model_path_that_is_not_a_directory(good_job, write_job, tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    good_job["pose"]["model"] = str(weights)
    one_error_line(invoke("validate", str(write_job(good_job))), "pose.model:", "is not a directory")


def test_model_that_is_not_vitpose(good_job, write_job, tmp_path):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    good_job["pose"]["model"] = str(bert)
    one_error_line(invoke("validate", str(write_job(good_job))), "pose.model:", "'bert'", "ViTPose")


def test_model_dir_without_a_config(good_job, write_job, tmp_path):
    (tmp_path / "empty-model").mkdir()
    good_job["pose"]["model"] = str(tmp_path / "empty-model")
    one_error_line(invoke("validate", str(write_job(good_job))), "pose.model:", "cannot load")


@pytest.mark.parametrize("command", ["validate", "submit"])
def test_unreachable_hub_id_fails_fast_with_a_fix(command, good_job, write_job, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good_job["pose"]["model"] = "usyd-community/vitpose-base-simple"
    started = time.monotonic()
    result = invoke(command, str(write_job(good_job)))
    elapsed = time.monotonic() - started
    line = one_error_line(result, "pose.model:", "usyd-community/vitpose-base-simple", "set pose.model: DIR")
    assert "--local-dir" in line
    assert elapsed < 10, elapsed


@pytest.mark.parametrize("command", ["validate", "submit"])
def test_existing_output_with_mode_error(command, good_job, write_job, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text("{}")
    one_error_line(invoke(command, str(write_job(good_job))), "output.path:", "already holds raypose output", "overwrite")
    assert (out / "_job.json").read_text() == "{}"


def test_a_manifest_raypose_did_not_write_is_never_replaced(good_job, write_job, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text('{"owner": "the data team"}')
    one_error_line(invoke("submit", str(write_job(good_job)), "--set", "output.mode=overwrite"), "output.path:",
                   "holds manifest.json that raypose did not write")


def test_existing_output_with_mode_overwrite_validates(good_job, write_job, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text("{}")
    result = invoke("validate", str(write_job(good_job)), "--set", "output.mode=overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "_job.json").exists()  # validate never clears output


# --- --debug --------------------------------------------------------------------------


def test_debug_shows_the_traceback(good_job, write_job):
    good_job["pose"]["batch_size"] = "abc"
    result = invoke("validate", str(write_job(good_job)), "--debug")
    assert result.exit_code == 1
    assert "error: " not in result.output
    assert isinstance(result.exception, SpecError)
    text = "".join(traceback.format_exception(*result.exc_info))
    assert "Traceback" in text and "load_job_spec" in text
    assert "pose.batch_size: expected a positive integer" in text


# --- submit stops before Ray ----------------------------------------------------------


@pytest.mark.parametrize(
    "breakage",
    [
        lambda job, tmp: job["pose"].update(batch_size=-1),
        lambda job, tmp: job["images"].update(path=str(tmp / "missing")),
        lambda job, tmp: (tmp / "out").mkdir() or (tmp / "out" / "_job.json").write_text("{}"),
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


def test_validate_resume_checks_a_resume_without_running_it(good_job, write_job, tmp_path):
    from raypose.config.spec import load_job_spec
    from raypose.output.resume import result_key, start_run
    from raypose.pipeline.plan import plan_job

    job = write_job(good_job)
    plan = plan_job(load_job_spec(job), run=True)
    start_run(plan.store, plan.spec, plan.shards, result_key(plan.spec, plan.models()), None, 0.0)  # a killed run's
    plan.close()
    ok = invoke("validate", str(job), "--resume")
    assert ok.exit_code == 0, ok.output
    assert "resume: 0 shards committed, 0 images in them kept, 3 to label in 1 new shards" in ok.output
    changed = invoke("validate", str(job), "--resume", "--set", "pose.flip_test=true")
    assert changed.exit_code == 2
    assert "error: output.mode: resume:" in changed.output and "pose.flip_test: false -> true" in changed.output
    assert invoke("validate", str(job), "--resume", "--force", "--set", "pose.flip_test=true").exit_code == 0
