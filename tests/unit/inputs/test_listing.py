"""Listing: directories, globs and manifests, local and fsspec URLs, stable relative keys, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
from helpers import listed, save_image

from raypose.config.spec import ImagesSpec
from raypose.errors import SpecError
from raypose.inputs.fetch import read_bytes
from raypose.inputs.listing import iter_images, list_images

# --- list_images ----------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path) -> Path:
    root = tmp_path / "images"
    save_image(root / "b.jpg")
    save_image(root / "A.PNG")
    save_image(root / "sub" / "deep" / "c.jpeg")
    save_image(root / "sub" / "d.png")
    save_image(root / ".hidden.jpg")
    save_image(root / ".cache" / "e.jpg")
    save_image(root / "sub" / ".thumbs" / "f.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "data.json").write_text("{}")
    return root


def test_list_directory_recursive_sorted_relative_keys(image_tree):
    table = list_images(ImagesSpec(path=str(image_tree))).images
    assert table.column_names == ["image_key", "image_uri", "image_size", "image_version"]
    # What the store says of each file: a replaced image is labelled again (resume.input_fingerprints).
    assert table.column("image_size").to_pylist() == [(image_tree / k).stat().st_size
                                                      for k in table.column("image_key").to_pylist()]
    assert all(v.startswith("mtime:") for v in table.column("image_version").to_pylist())
    # Upper-case extension kept, hidden files and folders skipped, non-images dropped, sorted by key.
    assert table.column("image_key").to_pylist() == ["A.PNG", "b.jpg", "sub/d.png", "sub/deep/c.jpeg"]
    for key, uri in listed(table):
        assert uri == (image_tree / key).as_uri()
        assert read_bytes(uri, {}) == (image_tree / key).read_bytes()


def test_list_extension_filter_is_case_insensitive(image_tree):
    table = list_images(ImagesSpec(path=str(image_tree), extensions=[".PNG"])).images
    assert table.column("image_key").to_pylist() == ["A.PNG", "sub/d.png"]


def test_list_glob_keys_relative_to_fixed_prefix(image_tree):
    table = list_images(ImagesSpec(path=f"{image_tree}/sub/**/*.*")).images
    assert table.column("image_key").to_pylist() == ["d.png", "deep/c.jpeg"]
    assert dict(listed(table))["deep/c.jpeg"] == (image_tree / "sub/deep/c.jpeg").as_uri()

    table = list_images(ImagesSpec(path=f"{image_tree}/sub/*/*.jpeg")).images
    assert listed(table) == [("deep/c.jpeg", (image_tree / "sub/deep/c.jpeg").as_uri())]


def test_list_manifest_relative_to_its_folder(image_tree):
    manifest = image_tree / "list.txt"
    manifest.write_text("# a comment\n\nsub/d.png\n  b.jpg  \n./sub/deep/c.jpeg\r\n   \n# sub/nope.jpg\n")
    table = list_images(ImagesSpec(path=str(manifest))).images
    assert table.column("image_key").to_pylist() == ["b.jpg", "sub/d.png", "sub/deep/c.jpeg"]
    for key, uri in listed(table):
        assert read_bytes(uri, {}) == (image_tree / key).read_bytes()


def test_list_manifest_entries_above_its_folder(image_tree):
    # A manifest kept in lists/ pointing at ../images/...: ".." is not a hidden folder.
    manifest = image_tree.parent / "lists" / "val.txt"
    manifest.parent.mkdir()
    manifest.write_text("../images/b.jpg\n../images/sub/d.png\n")
    table = list_images(ImagesSpec(path=str(manifest))).images
    assert table.column("image_key").to_pylist() == ["../images/b.jpg", "../images/sub/d.png"]
    assert table.column("image_uri").to_pylist() == [
        (image_tree / "b.jpg").as_uri(),
        (image_tree / "sub/d.png").as_uri(),
    ]


def test_list_memory_url(memory_root):
    table = list_images(ImagesSpec(path=f"memory://{memory_root}/imgs")).images
    assert listed(table) == [
        ("p/q.jpg", f"memory://{memory_root}/imgs/p/q.jpg"),
        ("r.PNG", f"memory://{memory_root}/imgs/r.PNG"),
    ]
    assert [read_bytes(uri, {}) for _, uri in listed(table)] == [b"q-bytes", b"r-bytes"]

    # One level only; the folder p/, the hidden .s.png and the .txt are not listed.
    table = list_images(ImagesSpec(path=f"memory://{memory_root}/imgs/*")).images
    assert listed(table) == [("r.PNG", f"memory://{memory_root}/imgs/r.PNG")]


def test_list_memory_manifest_resolves_parent_entries(memory_root):
    # Object stores do not resolve "a/../b" themselves, so the URI must already be resolved.
    fsspec.filesystem("memory").pipe(f"{memory_root}/lists/m.txt", b"../imgs/p/q.jpg\n../imgs/r.PNG\n")
    table = list_images(ImagesSpec(path=f"memory://{memory_root}/lists/m.txt")).images
    assert table.column("image_uri").to_pylist() == [
        f"memory://{memory_root}/imgs/p/q.jpg",
        f"memory://{memory_root}/imgs/r.PNG",
    ]
    assert [read_bytes(uri, {}) for uri in table.column("image_uri").to_pylist()] == [b"q-bytes", b"r-bytes"]


def test_list_missing_dir_is_spec_error(tmp_path):
    with pytest.raises(SpecError, match=r"^images\.path: .*nope.* is not a directory"):
        list_images(ImagesSpec(path=str(tmp_path / "nope")))


def test_list_empty_dir_is_spec_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(SpecError, match=r"^images\.path: no images under .*empty"):
        list_images(ImagesSpec(path=str(tmp_path / "empty")))


def _python_manifest(text: str) -> list[tuple[str, str]]:
    """What a URL manifest lists, read line by line in Python: (key, uri), the last of each key, by key."""
    import re

    entries = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries[re.sub(r"^[^:]*://", "", line)] = line
    return sorted(entries.items())


@pytest.mark.parametrize("text", [
    "s3://b/x/2.jpg\ns3://b/x/1.jpg\ns3://b/x/2.jpg\n",  # one scheme, unsorted, a key twice
    "s3://b/1.jpg\ns3://b/2.jpg\n# s3://b/3.jpg\n\n",  # sorted, with a comment and a blank line
    "s3://b/1.jpg\n gs://c/2.jpg\t\r\n\u3000s3://b/3.jpg\u3000\n",  # two schemes, ASCII and CJK whitespace
    "s3://b/é.jpg\ns3://b/1.jpg\n",  # a non-ASCII key
    "a:b://c/1.jpg\ns3://b/2.jpg\n",  # a colon before the scheme's "://"
])
def test_list_url_manifest_matches_line_by_line_reading(tmp_path, text):
    manifest = tmp_path / "m.txt"
    manifest.write_text(text, encoding="utf-8")
    assert listed(list_images(ImagesSpec(path=str(manifest))).images) == _python_manifest(text)


# --- any name storage holds -------------------------------------------------------------------


@pytest.fixture
def odd_names(tmp_path) -> Path:
    """A folder with glob characters in its name, holding a Latin-1 name, a colon name and glob characters."""
    root = tmp_path / "photos [2023]"
    save_image(root / "co::lon.jpg", color=(1, 2, 3))
    save_image(root / "star*[1]?.jpg", color=(4, 5, 6))
    with open(os.fsencode(root) + b"/caf\xe9.jpg", "wb") as f:  # bytes that are not UTF-8
        f.write(save_image(tmp_path / "latin1.jpg", color=(7, 8, 9)).read_bytes())
    return root


def test_list_and_read_any_name_a_folder_holds(odd_names):
    listing = list_images(ImagesSpec(path=str(odd_names)))
    assert listing.errors.num_rows == 0
    keys = listing.images.column("image_key").to_pylist()
    assert keys == ["caf%E9.jpg", "co::lon.jpg", "star*[1]?.jpg"]
    on_disk = {"caf%E9.jpg": os.fsencode(odd_names) + b"/caf\xe9.jpg"}
    for key, uri in listed(listing.images):
        assert uri == f"file://{odd_names}/{key}"
        with open(on_disk.get(key, odd_names / key), "rb") as f:
            assert read_bytes(uri, {}) == f.read()  # no glob, no "::" chaining, the escape read as its byte


def test_a_glob_only_where_no_path_exists(odd_names):
    assert list_images(ImagesSpec(path=f"{odd_names}/")).images.num_rows == 3
    # A glob through the folder escapes its "[" as fsspec's glob wants: "[[]".
    pattern = str(odd_names).replace("[", "[[]") + "/c*.jpg"
    assert list_images(ImagesSpec(path=pattern)).images.column("image_key").to_pylist() == ["caf%E9.jpg", "co::lon.jpg"]


def test_manifest_lines_that_are_not_utf8_are_escaped_as_listed_names(odd_names):
    manifest = odd_names.parent / "list.txt"
    manifest.write_bytes(b"photos [2023]/caf\xe9.jpg\nphotos [2023]/co::lon.jpg\n")
    images = list_images(ImagesSpec(path=str(manifest))).images
    assert images.column("image_key").to_pylist() == ["photos [2023]/caf%E9.jpg", "photos [2023]/co::lon.jpg"]
    assert read_bytes(images.column("image_uri")[0].as_py(), {}) == (odd_names.parent / "latin1.jpg").read_bytes()
    streamed = pa.concat_tables(iter_images(ImagesSpec(path=str(manifest)), chunk_rows=1))  # sorted: read by blocks
    assert streamed.column("image_key").to_pylist() == images.column("image_key").to_pylist()


def test_a_sorted_manifest_streams_in_chunks_and_an_unsorted_one_is_listed_whole(tmp_path, monkeypatch):
    from raypose.inputs import listing

    monkeypatch.setattr(listing, "MANIFEST_BLOCK_BYTES", 64)  # a few lines a block
    sorted_lines = [f"s3://b/img/{i:04d}.jpg" for i in range(10)]
    sorted_lines.insert(5, sorted_lines[4])  # listed twice: labelled once
    manifest = tmp_path / "sorted.txt"
    manifest.write_text("\n".join(sorted_lines) + "\n")
    whole = list_images(ImagesSpec(path=str(manifest))).images
    monkeypatch.setattr(listing, "list_images", lambda *a: pytest.fail("a sorted manifest is never listed whole"))
    chunks = list(listing.iter_images(ImagesSpec(path=str(manifest)), chunk_rows=3))
    assert all(c.num_rows <= 3 for c in chunks) and len(chunks) >= 4
    assert pa.concat_tables(chunks).column("image_key").to_pylist() == whole.column("image_key").to_pylist()
    assert len(whole) == 10
    monkeypatch.setattr(listing, "list_images", list_images)

    unsorted = tmp_path / "unsorted.txt"
    unsorted.write_text("\n".join(reversed(sorted_lines)) + "\n")
    chunks = list(listing.iter_images(ImagesSpec(path=str(unsorted)), chunk_rows=3))
    assert pa.concat_tables(chunks).column("image_key").to_pylist() == whole.column("image_key").to_pylist()


def test_a_manifest_sorted_at_first_and_not_later_is_reported(tmp_path, monkeypatch):
    from raypose.inputs import listing

    monkeypatch.setattr(listing, "MANIFEST_BLOCK_BYTES", 1000)
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"s3://b/{i:06d}.jpg\n" for i in range(400)) + "s3://b/000000-late.jpg\n")
    with pytest.raises(listing.NotSorted):
        list(listing._sorted_manifest_chunks(*listing.open_url(str(manifest), {}, "images.path"),
                                             ImagesSpec(path=str(manifest)), 1000))
