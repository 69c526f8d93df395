"""raypose.Job without Ray: from a YAML (with overrides as a mapping or --set strings), a dict or a spec; validate."""

from __future__ import annotations

import pytest
import yaml
from helpers import job_dict

from raypose import Job, JobCheck, JobSpec, SpecError


@pytest.fixture
def job_file(tmp_path, coco_folder, tiny_checkpoint):
    path = tmp_path / "jobs" / "job.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint,
                                            "../out")))
    return path


def test_from_yaml_takes_overrides_as_a_mapping_or_as_set_strings(job_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Job.from_yaml(job_file).spec.output.path == str(tmp_path / "out")  # relative to the file
    mapped = Job.from_yaml(job_file, {"pose.batch_size": 64, "output.path": "elsewhere", "pose.routing": {"dog": "coco"}})
    assert mapped.spec.pose.batch_size == 64 and mapped.spec.pose.routing == {"dog": "coco"}
    assert mapped.spec.output.path == str(tmp_path / "elsewhere")  # an override's: relative to the working directory
    assert Job.from_yaml(job_file, ["pose.batch_size=64"]).spec == Job.from_yaml(job_file, {"pose.batch_size": 64}).spec
    with pytest.raises(SpecError, match="pose.batch_size: expected a positive integer, got 0"):
        Job.from_yaml(job_file, {"pose.batch_size": 0})
    with pytest.raises(SpecError, match=r"overrides\['pose.batch_size.x'\]: pose.batch_size is not a section"):
        Job.from_yaml(job_file, {"pose.batch_size.x": 1})


def test_from_dict_and_from_spec_give_the_same_job(job_file, tmp_path):
    data = yaml.safe_load(job_file.read_text())
    from_dict = Job.from_dict(data, base=job_file.parent)
    assert from_dict.spec == Job.from_yaml(job_file).spec
    assert isinstance(from_dict.spec, JobSpec)
    assert Job.from_spec(from_dict.spec).spec is from_dict.spec
    assert Job.from_spec(from_dict.spec, {"pose.flip_test": True}).spec.pose.flip_test is True


def test_validate_checks_everything_and_starts_nothing(job_file, tiny_checkpoint, tmp_path):
    check = Job.from_yaml(job_file).validate()
    assert isinstance(check, JobCheck)
    assert check.counts["images"] == 3 and check.counts["boxes"] == 6
    assert check.experts["coco"].model == str(tiny_checkpoint) and check.experts["coco"].num_keypoints == 17
    assert check.experts["coco"].input_size == (192, 256)
    assert (check.shards_to_write, check.shards_kept, check.builds_on, check.mode) == (1, 0, False, "error")
    assert check.describe().startswith("ok: 3 images (3 with boxes, 0 without), 6 boxes; expert coco: ")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SpecError, match="images.path"):
        Job.from_yaml(job_file, {"images.path": str(tmp_path / "nowhere")}).validate()


def test_run_refuses_an_unknown_progress_option_and_leaves_the_output_free(job_file, tmp_path):
    job = Job.from_yaml(job_file)
    with pytest.raises(SpecError, match="progress: expected None, 'off', 'auto'"):
        job.run(progress="loud")
    assert job.validate().counts["images"] == 3  # no lease was left behind
    assert not (tmp_path / "out").exists()  # nor anything else
