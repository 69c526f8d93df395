"""Job files larger than a job can be (alias bombs, huge or deeply nested files) are refused before they are walked."""

from __future__ import annotations

import tracemalloc

import pytest

from raypose.config.job_yaml import MAX_VALUES, load_bounded_yaml
from raypose.config.spec import load_job_spec
from raypose.errors import SpecError

JOB = "images: {{path: /data/images}}\nboxes: {{path: /data/boxes.json}}\npose:\n  model: m\n{pose}\noutput: {{path: /data/out}}\n"


def alias_bomb(indent: str, levels: int = 9, width: int = 9) -> str:
    """Nine levels of nine aliases: ~700 bytes of YAML, 9**9 (387M) strings once expanded."""
    lines = [f"{indent}l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines)


def refused(path, overrides=()) -> tuple[str, int]:
    """The one-line error, and the bytes Python allocated at most on the way to it."""
    tracemalloc.start()
    try:
        with pytest.raises(SpecError) as info:
            load_job_spec(path, list(overrides))
        return str(info.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("where", ["images.storage_options", "pose.routing"])
def test_an_alias_bomb_is_refused_unexpanded_with_one_line(tmp_path, where):
    path = tmp_path / "job.yaml"
    if where == "pose.routing":
        path.write_text(JOB.format(pose="  routing:\n" + alias_bomb("    ")))
    else:
        text = JOB.format(pose="").replace("images: {path: /data/images}",
                                           "images:\n  path: /data/images\n  storage_options:\n" + alias_bomb("    "))
        path.write_text(text)
    assert len(path.read_bytes()) < 1024
    message, peak = refused(path)
    assert message == f"{path}: more than 10,000 values once its YAML aliases are expanded (a job needs a few hundred)"
    assert peak < 5 << 20  # bytes: the file's nodes, not their expansion


def test_a_bomb_given_with_set_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(pose=""))
    bomb = "{" + alias_bomb("").replace("\n", ", ") + "}"
    message, peak = refused(path, [f"pose.routing={bomb}"])
    assert message.startswith("--set pose.routing: more than 10,000 values") and "\n" not in message
    assert peak < 5 << 20


@pytest.mark.parametrize("text", [
    # merge keys: each level copies the pairs of the nine below it before any dict is built
    "a0: &a0 {" + ", ".join(f"k{i}: v" for i in range(9)) + "}\n"
    + "".join(f"a{n}: &a{n} {{{', '.join(f'<<: *a{n - 1}' for _ in range(9))}, x{n}: 1}}\n" for n in range(1, 10)),
    "a: &a [1, *a]\n",  # an alias inside itself: endless once expanded
], ids=["merge keys", "self reference"])
def test_merge_keys_and_self_reference_count_as_their_expansion(text):
    with pytest.raises(SpecError, match="more than 10,000 values"):
        load_bounded_yaml(text, "job.yaml")


def test_the_limit_counts_values_and_deep_or_huge_files_are_refused(tmp_path):
    hundred = "- &l [" + ", ".join(["x"] * 99) + "]\n"  # a list of 99 strings: 100 values
    assert MAX_VALUES == 10_000
    assert len(load_bounded_yaml(hundred + "- *l\n" * 98, "job.yaml")) == 99  # 1 + 99 * 100 = 9,901 values
    with pytest.raises(SpecError, match="more than 10,000 values"):
        load_bounded_yaml(hundred + "- *l\n" * 99, "job.yaml")  # 10,001
    with pytest.raises(SpecError, match="^job.yaml: nested deeper than 64 levels; a job is a few levels deep$"):
        load_bounded_yaml("[" * 5_000 + "]" * 5_000, "job.yaml")
    path = tmp_path / "job.yaml"
    path.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(SpecError, match=r"job.yaml: larger than 262,144 bytes; a job file is a few hundred"):
        load_job_spec(path)
