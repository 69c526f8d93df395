"""Names that are not UTF-8: `%XX` in tables, the bytes themselves on disk, UTF-8 names untouched."""

from __future__ import annotations

import os

import pyarrow as pa

from raypose.inputs.names import escaped, name_array, on_disk

LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # as os.listdir gives it: the byte 0xE9 as the surrogate \udce9


def test_escaped_writes_undecodable_bytes_as_percent_hex_and_leaves_utf8_alone():
    assert escaped(LATIN1) == "caf%E9.jpg"
    assert escaped(os.fsdecode(b"\xff\xfe/\xc3\xa9t\xe9.png")) == "%FF%FE/ét%E9.png"
    for name in ("plain.jpg", "café 写真.jpg", "100%.jpg", "caf%E9.jpg", "co::lon [1] *.jpg"):
        assert escaped(name) == name
    assert escaped("x\ud800.jpg") == "x%ED%A0%80.jpg"  # a lone surrogate from JSON: its UTF-8 bytes


def test_name_array_escapes_only_when_a_name_needs_it():
    assert name_array(["a.jpg", "é.jpg"]).to_pylist() == ["a.jpg", "é.jpg"]
    assert name_array(["a.jpg", LATIN1]).to_pylist() == ["a.jpg", "caf%E9.jpg"]
    assert name_array([]).type == pa.string()


def test_on_disk_takes_a_path_that_exists_and_else_the_bytes_its_escapes_stand_for(tmp_path):
    latin1 = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    open(latin1, "wb").close()
    assert on_disk(f"{tmp_path}/caf%E9.jpg") == os.fsdecode(latin1)
    literal = tmp_path / "100%E9.jpg"  # a UTF-8 name that happens to hold "%E9": exists, so it is the path
    literal.touch()
    assert on_disk(str(literal)) == str(literal)
    assert on_disk(f"{tmp_path}/gone%E9.jpg") == f"{tmp_path}/gone%E9.jpg"  # neither exists: as written
