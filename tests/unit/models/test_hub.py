"""Hub access and the weights check: broken weights are one spec error naming the field, before Ray starts."""

from __future__ import annotations

import shutil

import pytest
from helpers import job_dict
from typer.testing import CliRunner

from raypose.cli import app
from raypose.errors import SpecError
from raypose.models.vitpose import inspect_model
from raypose.testing.synthetic import make_checkpoint


@pytest.fixture
def copy_of(tiny_checkpoint, tmp_path):
    def copy(name: str = "model"):
        return shutil.copytree(tiny_checkpoint, tmp_path / name)

    return copy


def test_truncated_weights_are_refused_naming_the_field(copy_of):
    model = copy_of()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SpecError, match=r"^pose.model: .*model.safetensors is truncated: [\d,]+ bytes, its header "
                                        r"describes [\d,]+$"):
        inspect_model(str(model))
    weights.write_bytes(b"\x05")
    with pytest.raises(SpecError, match="is not a readable safetensors file"):
        inspect_model(str(model))


def test_weights_only_as_a_pickle_are_refused(copy_of):
    model = copy_of()
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(SpecError, match=r"has weights only as pytorch_model.bin \(a pickle, which raypose never loads\)"):
        inspect_model(str(model))
    (model / "pytorch_model.bin").unlink()
    with pytest.raises(SpecError, match="has no weights"):
        inspect_model(str(model))


def test_weights_of_another_shape_are_refused(copy_of, tmp_path):
    model = copy_of()
    other = make_checkpoint(tmp_path / "wholebody", num_keypoints=133)  # another head: 133 channels
    shutil.copy(other / "model.safetensors", model / "model.safetensors")
    with pytest.raises(SpecError, match=r"do not fit its config: 2 tensor\(s\) of another shape \(head\.conv\.bias: "
                                        r"\[133\], the config makes \[17\]\)"):
        inspect_model(str(model))


def test_validate_exits_2_with_one_line_for_broken_expert_weights(copy_of, tiny_checkpoint, coco_folder, write_job,
                                                                   tmp_path):
    broken = copy_of("wholebody")
    (broken / "model.safetensors").write_bytes(b"\x05")
    spec = job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "out")
    spec["pose"].update(routing={"person": "mine"}, experts={"mine": {"model": str(broken), "keypoint_schema": "coco17"}})
    result = CliRunner().invoke(app, ["validate", str(write_job(spec))])
    assert result.exit_code == 2
    assert result.output.startswith("error: pose.experts.mine.model: ") and result.output.count("\n") == 1


def test_a_model_that_looks_like_a_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """The fresh-clone trial: `--set pose.model=quickstart/vitpose-tiny` typed from the repository's root."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as raised:
        inspect_model("quickstart/vitpose-tiny", None, field="pose.model")
    message = str(raised.value)
    assert "it is not a folder here" in message and f"with --set, to the working directory {tmp_path}" in message
    assert "hub is not reachable" in message
