"""The spec's reference made from the spec: docs/job-spec.md and the JSON Schema are current, and the schema
accepts the bundled jobs and refuses what the spec refuses."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import REPO
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from raypose.cli import app
from raypose.config.reference import SCHEMA_FILE, job_json_schema, job_json_schema_text, job_spec_markdown
from raypose.config.spec import JobSpec, parse_job_spec

JOBS = sorted((REPO / "jobs").glob("*.yaml"))
MODELINE = re.compile(r"#\s*yaml-language-server:\s*\$schema=(\S+)")


def minimal() -> dict:
    return {"images": {"path": "/data"}, "boxes": {"path": "/boxes.json"}, "pose": {"model": "/model"},
            "output": {"path": "/out"}}


def test_the_job_spec_page_is_generated_from_the_spec():
    assert (REPO / "docs" / "job-spec.md").read_text() == job_spec_markdown(), (
        "docs/job-spec.md is stale: run `raypose schema --markdown > docs/job-spec.md`")


def test_the_schema_file_is_what_raypose_schema_prints():
    printed = CliRunner().invoke(app, ["schema"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == job_json_schema_text()
    assert (REPO / SCHEMA_FILE).read_text() == printed.output, (
        f"{SCHEMA_FILE} is stale: run `raypose schema > {SCHEMA_FILE}`")
    assert CliRunner().invoke(app, ["schema", "--markdown"]).output == job_spec_markdown()


def test_every_key_of_the_spec_is_in_the_page():
    page = job_spec_markdown()
    keys = set(re.findall(r"^\| `([a-z_.A-Z]+)` \|", page, flags=re.M))
    assert {"name", "images.path", "boxes.detector.threshold", "pose.experts.NAME.dataset_index",
            "resources.pose_actors", "limits.max_retries", "output.compression"} <= keys
    assert len(keys) == sum(1 for _ in _leaf_fields(JobSpec))


def _leaf_fields(section, prefix=""):
    from raypose.config.spec import section_type

    for name, info in section.model_fields.items():
        inner = section_type(info.annotation)
        if inner is not None:
            yield from _leaf_fields(inner, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"
            values = getattr(info.annotation, "__args__", ())
            if len(values) == 2 and section_type(values[1]) is not None:  # a mapping of sections: pose.experts
                yield from _leaf_fields(values[1], f"{prefix}{name}.NAME.")


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_bundled_jobs_point_an_editor_at_the_schema_and_validate_against_it(job):
    text = job.read_text()
    modeline = MODELINE.match(text.splitlines()[0])
    assert modeline, f"{job.name}: the first line names no schema for the YAML language server"
    assert (job.parent / modeline.group(1)).resolve() == (REPO / SCHEMA_FILE).resolve()
    Draft202012Validator(job_json_schema()).validate(yaml.safe_load(text))


def test_the_nightly_job_validates_against_the_schema():
    for document in yaml.safe_load_all((REPO / "infra" / "kuberay" / "nightly-spec.yaml").read_text()):
        Draft202012Validator(job_json_schema()).validate(yaml.safe_load(document["data"]["job.yaml"]))


@pytest.mark.parametrize("section, key, value", [
    ("pose", "batch_sise", 8),  # an unknown key
    ("pose", "batch_size", 0),
    ("pose", "dtype", "fp32"),
    ("images", "path", ""),
    ("boxes", "categories", ["person", ""]),
    ("boxes", "min_score", 1.5),
    ("resources", "pose_actors", [1, 2, 3]),
    ("resources", "cpus_per_pose_actor", 0),
    ("limits", "max_retries", -1),
    ("output", "mode", "append?"),
])
def test_the_schema_refuses_what_the_spec_refuses(section, key, value):
    raw = minimal()
    raw.setdefault(section, {})[key] = value
    validator = Draft202012Validator(job_json_schema())
    assert validator.is_valid(minimal()) and parse_job_spec(minimal())
    assert not validator.is_valid(raw)
    with pytest.raises(Exception, match=re.escape(f"{section}.{key}")):
        parse_job_spec(raw)


def test_the_schema_says_which_fields_decide_the_rows():
    schema = job_json_schema()
    assert schema["$defs"]["PoseSpec"]["properties"]["flip_test"]["decides_rows"] is True
    assert schema["$defs"]["PoseSpec"]["properties"]["batch_size"]["decides_rows"] is False
    assert json.loads(job_json_schema_text()) == schema
