"""The job spec: defaults, field-naming errors, --set overrides, relative paths, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import REPO

from raypose.config.spec import JobSpec, apply_override, load_job_spec, parse_job_spec
from raypose.errors import SpecError


def minimal() -> dict:
    return {
        "images": {"path": "/data/images"},
        "boxes": {"path": "/data/boxes.json"},
        "pose": {"model": "usyd-community/vitpose-base-simple"},
        "output": {"path": "/data/out"},
    }


def problems(raw: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_job_spec(raw)
    return str(info.value)


def with_field(section: str, key: str, value) -> dict:
    raw = minimal()
    raw.setdefault(section, {})[key] = value
    return raw


# --- defaults -------------------------------------------------------------------------


def test_minimal_yaml_gets_documented_defaults(write_job):
    spec = load_job_spec(write_job(minimal()))
    assert isinstance(spec, JobSpec)
    assert spec.name == "raypose-job"
    assert spec.images.format == "files"
    assert spec.images.storage_options == {}
    assert ".jpg" in spec.images.extensions and ".png" in spec.images.extensions
    assert spec.images.max_pixels == 100_000_000
    assert spec.boxes.source == "coco"
    assert spec.boxes.categories == ["person"]
    assert spec.boxes.min_area == 0.0 and spec.boxes.min_score == 0.0
    assert spec.boxes.include_crowd is False
    assert spec.boxes.storage_options is None
    assert spec.pose.batch_size is None  # by device: pose.default_batch_size
    assert spec.images.jpeg_draft is False
    assert spec.pose.dtype == "auto"
    assert spec.pose.device == "auto"
    assert spec.pose.expert == "coco"
    assert spec.pose.flip_test is False
    assert spec.pose.revision is None
    assert spec.resources.pose_actors is None  # by device: pipeline.pose_actor_layout
    assert spec.resources.cpus_per_pose_actor == 1.0
    assert spec.resources.gpus_per_pose_actor is None
    assert spec.resources.images_per_crop_task == 16
    assert spec.resources.num_cpus is None
    assert spec.output.mode == "error"
    assert spec.output.compression == "zstd"
    assert spec.output.storage_options is None


def test_boxes_and_output_inherit_the_images_storage_options():
    raw = minimal()
    raw["images"]["storage_options"] = {"anon": True}
    spec = parse_job_spec(raw)
    assert spec.boxes_storage_options() == {"anon": True}
    assert spec.output_storage_options() == {"anon": True}
    raw["output"]["storage_options"] = {"anon": False}
    assert parse_job_spec(raw).output_storage_options() == {"anon": False}


def test_spec_is_frozen():
    spec = parse_job_spec(minimal())
    with pytest.raises(Exception):
        spec.pose.batch_size = 64


# --- errors name the field and what was expected --------------------------------------


def test_batch_size_not_a_number_exact_message():
    assert 'pose.batch_size: expected a positive integer, got "abc"' in problems(
        with_field("pose", "batch_size", "abc")
    )


@pytest.mark.parametrize("value, shown", [(0, "0"), (-3, "-3"), (2.5, "2.5")])
def test_batch_size_must_be_a_positive_integer(value, shown):
    assert f"pose.batch_size: expected a positive integer, got {shown}" in problems(
        with_field("pose", "batch_size", value)
    )


def test_bool_is_not_an_int():
    message = problems(with_field("resources", "pose_actors", True))
    assert "resources.pose_actors: expected a positive integer, or [min, max] with 0 < min <= max, got true" in message
    assert "resources.images_per_crop_task: expected a positive integer, got true" in problems(
        with_field("resources", "images_per_crop_task", True))


@pytest.mark.parametrize("pool, problem", [([1, 4], None), (3, None), ([4, 1], "got [4, 1]"), ([0, 2], "got [0, 2]"),
                                           ([1, 2, 3], "got [1, 2, 3]")])
def test_actor_pools_are_a_size_or_min_and_max(pool, problem):
    if problem is None:
        assert parse_job_spec(with_field("resources", "pose_actors", pool)).resources.pose_actors == (
            tuple(pool) if isinstance(pool, list) else pool)
    else:
        assert f"resources.pose_actors: expected a positive integer, or [min, max] with 0 < min <= max, {problem}" in \
            problems(with_field("resources", "pose_actors", pool))


def test_int_is_not_a_bool():
    message = problems(with_field("pose", "flip_test", 1))
    assert "pose.flip_test: expected true or false, got 1" in message


def test_dtype_lists_the_allowed_values():
    message = problems(with_field("pose", "dtype", "fp8"))
    assert "pose.dtype:" in message
    assert '"fp8"' in message
    for allowed in ("auto", "float32", "bfloat16", "float16"):
        assert f"'{allowed}'" in message


def test_unknown_top_level_key_suggests_and_lists_allowed():
    raw = minimal()
    raw["pose_"] = {}
    raw["resourses"] = {"pose_actors": 2}
    message = problems(raw)
    assert "resourses: unknown key (did you mean 'resources'?)" in message
    assert "expected one of: name, images, boxes, pose, resources, limits, output" in message


def test_unknown_key_in_a_section_suggests_and_lists_allowed():
    message = problems(with_field("pose", "batchsize", 8))
    assert "pose.batchsize: unknown key (did you mean 'batch_size'?)" in message
    assert "expected one of: model, revision, expert, experts, routing, batch_size, dtype, device, flip_test" in message


def test_unknown_key_in_an_optional_section_lists_that_sections_keys():
    message = problems(with_field("output", "comression", "zstd"))
    assert "output.comression: unknown key (did you mean 'compression'?)" in message
    assert "images_per_shard" in message and "batch_size" not in message


def test_missing_required_field():
    raw = minimal()
    del raw["images"]["path"]
    assert "images.path: required, but missing" in problems(raw)


def test_missing_required_section():
    raw = minimal()
    del raw["pose"]
    assert "pose: required, but missing" in problems(raw)


def test_section_given_as_a_string():
    raw = minimal()
    raw["pose"] = "usyd-community/vitpose-base-simple"
    assert 'pose: expected a mapping, got "usyd-community/vitpose-base-simple"' in problems(raw)


def test_optional_section_given_as_a_string():
    raw = minimal()
    raw["resources"] = "lots"
    assert 'resources: expected a mapping, got "lots"' in problems(raw)


@pytest.mark.parametrize("name", ["has space", "-leading-dash", "x" * 129, "a/b"])
def test_name_pattern(name):
    message = problems({**minimal(), "name": name})
    assert message.count("name: expected letters, digits, '.', '_' or '-' (at most 128)") == 1


def test_good_name_accepted():
    assert parse_job_spec({**minimal(), "name": "coco-val_2017.v2"}).name == "coco-val_2017.v2"


def test_fraction_bounds():
    assert "boxes.min_score: expected a number between 0 and 1, got 1.5" in problems(
        with_field("boxes", "min_score", 1.5)
    )


def test_categories_must_be_a_list():
    assert 'boxes.categories: expected a list of strings, got "person"' in problems(
        with_field("boxes", "categories", "person")
    )


def test_categories_null_means_all():
    assert parse_job_spec(with_field("boxes", "categories", None)).boxes.categories is None


def test_every_problem_is_listed_in_one_error():
    raw = minimal()
    raw["pose"]["batch_size"] = "abc"
    raw["pose"]["dtype"] = "fp8"
    raw["output"]["mode"] = "sometimes"
    raw["colour"] = "red"
    del raw["images"]["path"]
    message = problems(raw)
    lines = message.splitlines()
    assert lines[0] == "invalid job spec:"
    assert len(lines) == 6
    for field in ("images.path:", "pose.batch_size:", "pose.dtype:", "output.mode:", "colour:"):
        assert sum(line.strip().startswith(field) for line in lines) == 1, field


def test_a_single_problem_is_one_line():
    message = problems(with_field("pose", "batch_size", "abc"))
    assert message == 'invalid job spec: pose.batch_size: expected a positive integer, got "abc"'


# --- the file itself ------------------------------------------------------------------


def test_not_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("images: {path: [unclosed\n  pose: : :\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job_spec(path)


def test_not_text(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81images: x\n")
    with pytest.raises(SpecError, match="not a UTF-8 text file"):
        load_job_spec(path)


def test_empty_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("")
    with pytest.raises(SpecError, match=r"job.yaml: the job file is empty; expected the sections images, boxes, pose "
                                        r"and output"):
        load_job_spec(path)


def test_top_level_list(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("- images\n- pose\n")
    with pytest.raises(SpecError, match="expected a mapping of sections at the top level, got list"):
        load_job_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read the job file"):
        load_job_spec(tmp_path / "nope.yaml")


def test_a_directory_is_not_a_job_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read the job file"):
        load_job_spec(tmp_path)


def test_python_tags_are_rejected_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(minimal())
        + f'name: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job_spec(path)
    assert not marker.exists()


# --- --set overrides ------------------------------------------------------------------


def test_overrides_parse_values_as_yaml(write_job):
    spec = load_job_spec(
        write_job(minimal()),
        ["pose.batch_size=64", "output.path=/tmp/x", "pose.flip_test=true", "boxes.min_score=0.5"],
    )
    assert spec.pose.batch_size == 64
    assert spec.output.path == "/tmp/x"
    assert spec.pose.flip_test is True
    assert spec.boxes.min_score == 0.5


def test_override_creates_missing_sections(write_job):
    spec = load_job_spec(write_job(minimal()), ["resources.pose_actors=3", "name=override-name"])
    assert spec.resources.pose_actors == 3
    assert spec.name == "override-name"


def test_override_value_keeps_everything_after_the_first_equals(write_job):
    spec = load_job_spec(write_job(minimal()), ["output.path=s3://bucket/run=1"])
    assert spec.output.path == "s3://bucket/run=1"


def test_overridden_value_is_validated(write_job):
    with pytest.raises(SpecError, match='pose.batch_size: expected a positive integer, got "abc"'):
        load_job_spec(write_job(minimal()), ["pose.batch_size=abc"])


def test_override_of_a_non_section(write_job):
    with pytest.raises(SpecError, match="--set pose.batch_size.x: pose.batch_size is not a section"):
        load_job_spec(write_job(with_field("pose", "batch_size", 8)), ["pose.batch_size.x=1"])
    with pytest.raises(SpecError, match="--set name.x: name is not a section"):
        load_job_spec(write_job({**minimal(), "name": "job"}), ["name.x=1"])


def test_override_into_a_defaulted_scalar_fails_validation(write_job):
    with pytest.raises(SpecError, match='pose.batch_size: expected a positive integer, got {"x": 1}'):
        load_job_spec(write_job(minimal()), ["pose.batch_size.x=1"])


@pytest.mark.parametrize("override", ["nokey", "=5", " =5"])
def test_malformed_override(write_job, override):
    with pytest.raises(SpecError, match="expected dotted.key=value"):
        load_job_spec(write_job(minimal()), [override])


def test_apply_override_nested_creation():
    raw: dict = {}
    apply_override(raw, "a.b.c=[1, 2]")
    assert raw == {"a": {"b": {"c": [1, 2]}}}


# --- relative paths -------------------------------------------------------------------


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "ckpt").mkdir()
    raw = {
        "images": {"path": "data/images"},
        "boxes": {"path": "../boxes.json"},
        "pose": {"model": "ckpt"},
        "output": {"path": "out"},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_job_spec(Path("..") / "jobs" / "job.yaml")
    base = folder.resolve()
    assert spec.images.path == str(base / "data/images")
    assert spec.boxes.path == str(base.parent / "boxes.json")  # normalised: no ".." left
    assert spec.output.path == str(base / "out")
    assert spec.pose.model == str(base / "ckpt")


def test_absolute_paths_and_urls_are_untouched(write_job, tmp_path):
    raw = {
        "images": {"path": "s3://bucket/images"},
        "boxes": {"path": "gs://bucket/boxes.json"},
        "pose": {"model": "/models/vitpose"},
        "output": {"path": str(tmp_path / "abs-out")},
    }
    spec = load_job_spec(write_job(raw))
    assert spec.images.path == "s3://bucket/images"
    assert spec.boxes.path == "gs://bucket/boxes.json"
    assert spec.pose.model == "/models/vitpose"
    assert spec.output.path == str(tmp_path / "abs-out")


def test_hub_id_stays_a_hub_id(write_job):
    spec = load_job_spec(write_job(minimal()))
    assert spec.pose.model == "usyd-community/vitpose-base-simple"


def test_model_resolved_only_when_the_directory_exists(write_job, tmp_path):
    (tmp_path / "usyd-community" / "vitpose-base-simple").mkdir(parents=True)
    spec = load_job_spec(write_job(minimal()))
    assert spec.pose.model == str(tmp_path.resolve() / "usyd-community" / "vitpose-base-simple")


def test_overrides_resolve_against_the_working_directory_not_the_yaml(write_job, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    spec = load_job_spec(write_job(minimal()), ["output.path=relative/out"])
    assert spec.output.path == str(tmp_path.parent / "relative" / "out")


# --- redaction and fingerprint --------------------------------------------------------


def secret_spec(**changes) -> JobSpec:
    raw = minimal()
    raw["images"]["storage_options"] = {
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t",
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    raw["output"]["storage_options"] = {"token": "tok", "password": "pw", "anon": False}
    for dotted, value in changes.items():
        apply_override(raw, f"{dotted.replace('__', '.')}={value}")
    return parse_job_spec(raw)


def test_redacted_hides_credentials_and_keeps_the_rest():
    redacted = secret_spec().redacted()
    images = redacted["images"]["storage_options"]
    assert images["key"] == "***" and images["secret"] == "***"
    assert images["endpoint_url"] == "http://127.0.0.1:9000"
    assert images["client_kwargs"] == {"region_name": "eu-west-1"}
    output = redacted["output"]["storage_options"]
    assert output == {"token": "***", "password": "***", "anon": False}
    assert "AKIAEXAMPLE" not in str(redacted) and "s3cr3t" not in str(redacted)


def test_redacted_keeps_fields_whose_names_look_like_credentials():
    redacted = secret_spec(boxes__image_key_column="file_name", pose__batch_size=32).redacted()
    assert redacted["boxes"]["image_key_column"] == "file_name"
    assert redacted["pose"]["batch_size"] == 32
    assert redacted["images"]["path"] == "/data/images"


def test_redacted_does_not_change_the_spec():
    spec = secret_spec()
    spec.redacted()
    assert spec.images.storage_options["secret"] == "s3cr3t"


def test_fingerprint_is_stable():
    assert secret_spec().fingerprint() == secret_spec().fingerprint()
    assert len(secret_spec().fingerprint()) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"pose__batch_size": "64"},
        {"output__path": "/elsewhere"},
        {"boxes__image_key_column": "file_name"},
        {"images__storage_options__endpoint_url": "http://other:9000"},
    ],
)
def test_fingerprint_changes_with_a_field(change):
    assert secret_spec(**change).fingerprint() != secret_spec().fingerprint()


def test_fingerprint_ignores_secrets():
    rotated = secret_spec(images__storage_options__secret="rotated", output__storage_options__token="new")
    assert rotated.images.storage_options["secret"] == "rotated"
    assert rotated.fingerprint() == secret_spec().fingerprint()


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_jobs_are_valid_specs(job):
    spec = load_job_spec(job)
    assert spec.output.path and spec.pose.model


def test_speed_knobs_take_what_they_name():
    assert "images.jpeg_draft:" in problems(with_field("images", "jpeg_draft", "sometimes"))
    wrong = problems(with_field("resources", "crop_in", "gpu"))
    assert "resources.crop_in:" in wrong and "pose_device" in wrong
    assert "resources.pose_calls_per_actor: expected a positive integer, got 0" in problems(
        with_field("resources", "pose_calls_per_actor", 0))


def test_jpeg_draft_is_refused_where_the_device_decodes():
    spec = with_field("resources", "crop_in", "pose_device")
    spec["images"]["jpeg_draft"] = True
    assert "images.jpeg_draft: only where the CPU decodes" in problems(spec)


def test_a_gpu_decoder_is_refused_where_the_device_does_not_decode():
    spec = with_field("images", "gpu_decoder", "nvimgcodec")
    assert ("images.gpu_decoder: nvimgcodec decodes on the pose device only (resources.crop_in: pose_device; "
            "it is auto)") in problems(spec)
    spec["resources"] = {"crop_in": "pose_device"}
    assert parse_job_spec(spec).images.gpu_decoder == "nvimgcodec"
    assert "images.gpu_decoder:" in problems(with_field("images", "gpu_decoder", "dali"))


def test_an_error_message_serialises_no_more_of_a_value_than_it_shows():
    import tracemalloc

    bomb = ["lol"] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # 9**10 strings once walked, one list a level in memory
    tracemalloc.start()
    try:
        message = problems(with_field("pose", "routing", {"person": bomb}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message.startswith('invalid job spec: pose.routing: expected a mapping') and message.endswith('"lol", ...')
    assert len(message) < 200 and peak < 1 << 20


def test_every_field_says_what_it_means_and_whether_it_decides_the_rows():
    """The spec is the one source of its fields' facts (docs/job-spec.md, the JSON Schema and the result key
    are made from it): a field added without them would be undocumented and silently left out of resume's key."""
    from raypose.config.spec import ExpertSpec, section_type

    def fields(section, prefix=""):
        for name, info in section.model_fields.items():
            inner = section_type(info.annotation)
            if inner is None:
                yield f"{prefix}{name}", info
            else:
                assert info.description, f"{prefix}{name}: a section without a description"
                yield from fields(inner, f"{prefix}{name}.")

    for name, info in [*fields(JobSpec), *fields(ExpertSpec, "pose.experts.NAME.")]:
        assert info.description and info.description.endswith("."), f"{name}: no description (a sentence)"
        assert isinstance((info.json_schema_extra or {}).get("decides_rows"), bool), (
            f"{name}: say whether it decides the output rows (_field(..., decides_rows=...))")
