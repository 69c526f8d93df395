"""The reader (listing, reading, decoding hostile images) and the CPU crop stage without Ray."""

from __future__ import annotations

import io
import struct
import uuid
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raypose.crops import make_crops
from raypose.errors import SpecError
from raypose.reader import ImageError, decode_image, list_images, probe_image, read_bytes, read_images
from raypose.spec import ImagesSpec
from raypose.table import CROP_SCHEMA, IMAGE_TASK_SCHEMA

MAX_PIXELS = 1_000_000
INPUT_SIZE = (192, 256)  # (width, height)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def save(path: Path, size=(4, 3), color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header claims width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def rows(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("image_key").to_pylist(), table.column("image_uri").to_pylist()))


# --- list_images ----------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path) -> Path:
    root = tmp_path / "images"
    save(root / "b.jpg")
    save(root / "A.PNG")
    save(root / "sub" / "deep" / "c.jpeg")
    save(root / "sub" / "d.png")
    save(root / ".hidden.jpg")
    save(root / ".cache" / "e.jpg")
    save(root / "sub" / ".thumbs" / "f.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "data.json").write_text("{}")
    return root


def test_list_directory_recursive_sorted_relative_keys(image_tree):
    table = list_images(ImagesSpec(path=str(image_tree)))
    assert table.column_names == ["image_key", "image_uri"]
    # Upper-case extension kept, hidden files and folders skipped, non-images dropped, sorted by key.
    assert table.column("image_key").to_pylist() == ["A.PNG", "b.jpg", "sub/d.png", "sub/deep/c.jpeg"]
    for key, uri in rows(table):
        assert uri == (image_tree / key).as_uri()
        assert read_bytes(uri, {}) == (image_tree / key).read_bytes()


def test_list_extension_filter_is_case_insensitive(image_tree):
    table = list_images(ImagesSpec(path=str(image_tree), extensions=[".PNG"]))
    assert table.column("image_key").to_pylist() == ["A.PNG", "sub/d.png"]


def test_list_glob_keys_relative_to_fixed_prefix(image_tree):
    table = list_images(ImagesSpec(path=f"{image_tree}/sub/**/*.*"))
    assert table.column("image_key").to_pylist() == ["d.png", "deep/c.jpeg"]
    assert dict(rows(table))["deep/c.jpeg"] == (image_tree / "sub/deep/c.jpeg").as_uri()

    table = list_images(ImagesSpec(path=f"{image_tree}/sub/*/*.jpeg"))
    assert rows(table) == [("deep/c.jpeg", (image_tree / "sub/deep/c.jpeg").as_uri())]


def test_list_manifest_relative_to_its_folder(image_tree):
    manifest = image_tree / "list.txt"
    manifest.write_text("# a comment\n\nsub/d.png\n  b.jpg  \n./sub/deep/c.jpeg\r\n   \n# sub/nope.jpg\n")
    table = list_images(ImagesSpec(path=str(manifest)))
    assert table.column("image_key").to_pylist() == ["b.jpg", "sub/d.png", "sub/deep/c.jpeg"]
    for key, uri in rows(table):
        assert read_bytes(uri, {}) == (image_tree / key).read_bytes()


def test_list_manifest_entries_above_its_folder(image_tree):
    # A manifest kept in lists/ pointing at ../images/...: ".." is not a hidden folder.
    manifest = image_tree.parent / "lists" / "val.txt"
    manifest.parent.mkdir()
    manifest.write_text("../images/b.jpg\n../images/sub/d.png\n")
    table = list_images(ImagesSpec(path=str(manifest)))
    assert table.column("image_key").to_pylist() == ["../images/b.jpg", "../images/sub/d.png"]
    assert table.column("image_uri").to_pylist() == [
        (image_tree / "b.jpg").as_uri(),
        (image_tree / "sub/d.png").as_uri(),
    ]


@pytest.fixture
def memory_root():
    fs = fsspec.filesystem("memory")
    root = f"/raypose-test-{uuid.uuid4().hex}"
    fs.pipe(f"{root}/imgs/p/q.jpg", b"q-bytes")
    fs.pipe(f"{root}/imgs/r.PNG", b"r-bytes")
    fs.pipe(f"{root}/imgs/.s.png", b"hidden")
    fs.pipe(f"{root}/imgs/t.txt", b"text")
    yield root
    fs.rm(root, recursive=True)


def test_list_memory_url(memory_root):
    table = list_images(ImagesSpec(path=f"memory://{memory_root}/imgs"))
    assert rows(table) == [
        ("p/q.jpg", f"memory://{memory_root}/imgs/p/q.jpg"),
        ("r.PNG", f"memory://{memory_root}/imgs/r.PNG"),
    ]
    assert [read_bytes(uri, {}) for _, uri in rows(table)] == [b"q-bytes", b"r-bytes"]

    # One level only; the folder p/, the hidden .s.png and the .txt are not listed.
    table = list_images(ImagesSpec(path=f"memory://{memory_root}/imgs/*"))
    assert rows(table) == [("r.PNG", f"memory://{memory_root}/imgs/r.PNG")]


def test_list_memory_manifest_resolves_parent_entries(memory_root):
    # Object stores do not resolve "a/../b" themselves, so the URI must already be resolved.
    fsspec.filesystem("memory").pipe(f"{memory_root}/lists/m.txt", b"../imgs/p/q.jpg\n../imgs/r.PNG\n")
    table = list_images(ImagesSpec(path=f"memory://{memory_root}/lists/m.txt"))
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


def test_read_bytes_odd_file_names(tmp_path):
    path = save(tmp_path / "odd names" / "a photo é ü 写真.jpg", size=(5, 4), color=(200, 100, 50))
    [(key, uri)] = rows(list_images(ImagesSpec(path=str(tmp_path / "odd names"))))
    assert key == "a photo é ü 写真.jpg"
    assert uri.startswith("file://")
    data = read_bytes(uri, {})
    assert data == path.read_bytes()
    assert decode_image(data, MAX_PIXELS).size == (5, 4)


def test_read_bytes_missing_object(tmp_path, memory_root):
    for uri in ((tmp_path / "gone.jpg").as_uri(), f"memory://{memory_root}/imgs/gone.jpg"):
        with pytest.raises(ImageError, match="not found in storage") as info:
            read_bytes(uri, {})
        assert info.value.stage == "read"


def test_read_bytes_unreadable_object(tmp_path):
    with pytest.raises(ImageError, match="cannot read: IsADirectoryError") as info:
        read_bytes(tmp_path.as_uri(), {})
    assert info.value.stage == "read"


# --- decode_image: hostile inputs -----------------------------------------------------------


def decode_error(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels)
    return info.value


def test_decode_zero_bytes():
    error = decode_error(b"")
    assert (error.stage, str(error)) == ("decode", "empty file (0 bytes)")


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.98])
def test_decode_truncated_jpeg(keep):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    error = decode_error(data[: int(len(data) * keep)])
    assert error.stage == "decode"
    assert str(error).startswith("corrupt or truncated image data: ")


def test_decode_not_an_image():
    error = decode_error(b"<html>404 not found</html>\n" * 10)
    assert (error.stage, str(error)) == ("decode", "not an image Pillow can decode (unknown format)")


def test_decode_non_image_named_jpg_through_storage(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("this is a text file with a .jpg name")
    [(_, uri)] = rows(list_images(ImagesSpec(path=str(tmp_path))))
    error = decode_error(read_bytes(uri, {}))
    assert "unknown format" in str(error) and error.stage == "decode"


def test_decode_bomb_declared_size_beyond_pillow_limit():
    error = decode_error(png_declaring(100_000, 100_000))
    assert error.stage == "decode"
    assert "decompression bomb" in str(error)


def test_decode_bomb_above_max_pixels():
    error = decode_error(png_declaring(5000, 4000), max_pixels=MAX_PIXELS)
    assert error.stage == "decode"
    assert str(error).startswith("5000x4000 = 20 Mpx is above images.max_pixels")
    assert "decompression bomb" in str(error)


def test_decode_real_image_above_max_pixels():
    data = encode(Image.new("RGB", (20, 10)), "PNG")
    assert "is above images.max_pixels" in str(decode_error(data, max_pixels=199))
    assert decode_image(data, max_pixels=200).size == (20, 10)


def test_decode_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 65535, 32896, 257, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on disk
    image = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.shape == (1, 5, 3)
    assert (pixels == pixels[..., :1]).all()  # gray stays gray
    assert pixels[0, :, 0].tolist() == [0, 255, 128, 1, 4]


def test_decode_palette():
    image = Image.new("P", (3, 2), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    pixels = np.asarray(decode_image(encode(image, "PNG"), MAX_PIXELS))
    assert pixels.shape == (2, 3, 3)
    assert pixels[1, 1].tolist() == [10, 200, 30]
    assert pixels[0, 0].tolist() == [0, 0, 0]


def test_decode_palette_transparency_on_white():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 0), 1)
    pixels = np.asarray(decode_image(encode(image, "PNG", transparency=0), MAX_PIXELS))
    assert pixels[0].tolist() == [[255, 255, 255], [10, 200, 30]]


def test_decode_cmyk_jpeg():
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image)[4, 4].tolist()
    assert red > 240 and green < 15 and blue < 15


def test_decode_grayscale():
    image = decode_image(encode(Image.new("L", (3, 2), 77), "PNG"), MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (3, 2)
    assert (np.asarray(image) == 77).all()


def test_decode_rgba_composited_on_white():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 0, 128)])
    pixels = np.asarray(decode_image(encode(image, "PNG"), MAX_PIXELS))
    assert pixels[0, 0].tolist() == [255, 0, 0]  # opaque: unchanged
    assert pixels[0, 1].tolist() == [255, 255, 255]  # transparent: white, not the hidden red
    assert pixels[0, 2].tolist() == [127, 127, 127]  # half black over white


def test_decode_gray_alpha_composited_on_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 255), (0, 0)])
    pixels = np.asarray(decode_image(encode(image, "PNG"), MAX_PIXELS))
    assert pixels[0].tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize("mode, transparent", [("L", 0), ("RGB", (0, 0, 0))])
def test_decode_colour_key_transparency_on_white(mode, transparent):
    # A tRNS colour key on a grayscale or RGB PNG: transformers' convert_to_rgb makes it white too.
    image = Image.new(mode, (2, 1), transparent)
    image.putpixel((1, 0), 90 if mode == "L" else (90, 90, 90))
    data = encode(image, "PNG", transparency=transparent)
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None
    pixels = np.asarray(decode_image(data, MAX_PIXELS))
    assert pixels[0].tolist() == [[255, 255, 255], [90, 90, 90]]


def test_decode_animated_gif_first_frame():
    frames = [Image.new("RGB", (6, 5), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (6, 5)
    assert (np.asarray(image) == [255, 0, 0]).all()


def test_decode_exif_rotated_jpeg():
    # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 = rotate 90° clockwise.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = 6
    image = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), MAX_PIXELS)
    assert image.size == (20, 40)
    shown = np.asarray(image).astype(int)
    # Clockwise: the stored left (red) half is now on top, the right (blue) half at the bottom.
    assert np.abs(shown[5, 10] - [255, 0, 0]).max() < 8
    assert np.abs(shown[35, 10] - [0, 0, 255]).max() < 8


def test_probe_reads_the_shown_size_from_the_header_and_tells_plain_jpegs():
    rotated = Image.new("RGB", (40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6
    assert probe_image(encode(rotated, "JPEG", exif=exif.tobytes()), MAX_PIXELS) == ((20, 40), False)
    assert probe_image(encode(Image.new("RGB", (7, 5)), "JPEG"), MAX_PIXELS) == ((7, 5), True)
    assert probe_image(encode(Image.new("L", (7, 5)), "JPEG"), MAX_PIXELS) == ((7, 5), True)
    assert probe_image(encode(Image.new("CMYK", (7, 5)), "JPEG"), MAX_PIXELS) == ((7, 5), False)
    assert probe_image(encode(Image.new("RGB", (7, 5)), "PNG"), MAX_PIXELS) == ((7, 5), False)
    with pytest.raises(ImageError, match="above images.max_pixels"):
        probe_image(encode(Image.new("RGB", (7, 5)), "JPEG"), 34)
    with pytest.raises(ImageError, match="empty file"):
        probe_image(b"", MAX_PIXELS)


def test_read_images_attaches_bytes_and_turns_a_failed_read_into_the_rows_error(tmp_path):
    path = save(tmp_path / "a.png")
    rows = [
        {"image_key": "a.png", "image_uri": path.as_uri(), "box_xywh": [[0, 0, 2, 2]]},
        {"image_key": "gone.png", "image_uri": (tmp_path / "gone.png").as_uri(), "box_xywh": [[0, 0, 2, 2]]},
        {"image_key": "none.png", "image_uri": (tmp_path / "none.png").as_uri(), "box_xywh": []},
    ]
    got = read_images(pa.Table.from_pylist(rows, schema=IMAGE_TASK_SCHEMA), storage_options={}).to_pylist()
    assert got[0]["image_bytes"] == path.read_bytes() and got[0]["error_stage"] is None
    assert (got[1]["image_bytes"], got[1]["error_stage"], got[1]["error_reason"]) == (None, "read", "not found in storage")
    assert got[2]["image_bytes"] is None and got[2]["error_stage"] is None  # no box: nothing to read


def test_decode_one_pixel():
    image = decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), MAX_PIXELS)
    assert image.size == (1, 1)
    assert np.asarray(image).tolist() == [[[1, 2, 3]]]


# --- the CPU stage, without Ray -------------------------------------------------------------


@pytest.fixture
def crop_inputs(tmp_path):
    rng = np.random.default_rng(1)
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(good)  # 160x120
    (tmp_path / "empty.jpg").write_bytes(b"")
    jpeg = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return tmp_path


CROP_ARGS = dict(
    input_sizes={"coco": INPUT_SIZE}, routes={}, default_expert="coco", storage_options={}, max_pixels=MAX_PIXELS
)


def task(folder: Path, name: str, boxes: list[list[float]], size=(160, 120)) -> dict:
    return {
        "image_key": name,
        "image_uri": (folder / name).as_uri(),
        "expected_width": size[0] if size else None,
        "expected_height": size[1] if size else None,
        "box_xywh": boxes,
        "annotation_id": list(range(100, 100 + len(boxes))),
        "category": ["person"] * len(boxes),
        "box_score": [None] * len(boxes),
        "box_source": "gt",
    }


def test_make_crops_outcomes(crop_inputs):
    nan = float("nan")
    boxes = [
        [10, 20, 50, 80],  # 0 inside
        [nan, 0, 10, 10],  # 1 NaN
        [5, 5, 0, 10],  # 2 zero width
        [5, 5, 10, -3],  # 3 negative height
        [500, 500, 10, 10],  # 4 fully outside
        [-20, 100, 60, 40],  # 5 partly outside: clipped to [0, 100, 40, 20]
    ]
    batch = pa.Table.from_pylist(
        [
            task(crop_inputs, "good.png", boxes),
            task(crop_inputs, "missing.jpg", [[0, 0, 10, 10]]),
            task(crop_inputs, "empty.jpg", [[0, 0, 10, 10]]),
            task(crop_inputs, "truncated.jpg", [[0, 0, 10, 10]]),
            task(crop_inputs, "good.png", [[0, 0, 10, 10]], size=(320, 240)),  # wrong expected size
            task(crop_inputs, "good.png", [[0, 0, 10, 10]], size=None),  # size unknown: not checked
        ],
        schema=IMAGE_TASK_SCHEMA,
    )
    out = make_crops(batch, **CROP_ARGS)
    crop_bytes = 256 * 192 * 3
    assert out.schema.field("crop").type == pa.binary()
    got = out.to_pylist()
    assert len(got) == 6 + 4 + 1
    by_box = got[:6]

    for row, index in ((by_box[0], 0), (by_box[5], 5)):
        assert row["error_stage"] is None and row["error_reason"] is None
        assert row["crop"] is not None and len(row["crop"]) == crop_bytes
        assert (row["image_width"], row["image_height"]) == (160, 120)
        assert row["instance_index"] == index and row["annotation_id"] == 100 + index
        assert row["category"] == "person" and row["box_source"] == "gt" and row["expert"] == "coco"
        assert len(row["center"]) == 2 and len(row["scale"]) == 2
    assert by_box[0]["bbox"] == [10, 20, 50, 80]
    assert by_box[0]["center"] == [35, 60]
    assert by_box[5]["bbox"] == [0, 100, 40, 20]  # clipped, and cropped around the clipped box
    assert by_box[5]["center"] == [20, 110]
    crop = np.frombuffer(by_box[0]["crop"], np.uint8).reshape(256, 192, 3)
    assert crop.std() > 10  # sampled from the noise image, not blank

    expected_box_errors = {
        1: "non-finite coordinate",
        2: "zero or negative size",
        3: "zero or negative size",
        4: "lies outside the 160x120 image",
    }
    for index, reason in expected_box_errors.items():
        row = by_box[index]
        assert row["instance_index"] == index
        assert row["error_stage"] == "boxes" and reason in row["error_reason"]
        assert row["crop"] is None and row["bbox"] is None
        assert (row["image_width"], row["image_height"]) == (160, 120)

    failures = {row["image_key"]: row for row in got[6:10]}
    assert failures["missing.jpg"]["error_stage"] == "read"
    assert failures["missing.jpg"]["error_reason"] == "not found in storage"
    assert failures["empty.jpg"]["error_stage"] == "decode"
    assert failures["empty.jpg"]["error_reason"] == "empty file (0 bytes)"
    assert failures["truncated.jpg"]["error_stage"] == "decode"
    assert failures["truncated.jpg"]["error_reason"].startswith("corrupt or truncated")
    size_row = got[9]
    assert size_row["image_key"] == "good.png"
    assert size_row["error_stage"] == "decode"
    assert size_row["error_reason"] == "image is 160x120 but the boxes file says 320x240"
    for row in got[6:10]:
        assert row["crop"] is None and row["instance_index"] is None and row["bbox"] is None

    unchecked = got[10]
    assert unchecked["error_stage"] is None and len(unchecked["crop"]) == crop_bytes
    # A pose actor decodes and cuts several images at once: the same rows, in the same order.
    assert make_crops(batch, **CROP_ARGS, threads=3).equals(out)


@pytest.mark.parametrize("threads", [1, 2])
def test_an_unforeseen_crop_failure_costs_only_its_image(crop_inputs, monkeypatch, threads):
    import raypose.crops

    cut = raypose.crops.crop_image

    def crop_image(image, center, scale, input_size, **kwargs):
        if center[0] > 100:  # the second box of the first image
            raise MemoryError("no room")
        return cut(image, center, scale, input_size, **kwargs)

    monkeypatch.setattr(raypose.crops, "crop_image", crop_image)
    batch = pa.Table.from_pylist(
        [task(crop_inputs, "good.png", [[10, 20, 50, 80], [110, 20, 40, 80]]), task(crop_inputs, "good.png", [[0, 0, 10, 10]])],
        schema=IMAGE_TASK_SCHEMA,
    )
    got = make_crops(batch, **CROP_ARGS, threads=threads).to_pylist()
    assert [(r["instance_index"], r["error_stage"], r["error_reason"], r["image_rows"]) for r in got] == [
        (None, "crop", "MemoryError: no room", 1), (0, None, None, 1)]
    assert got[1]["crop"] is not None


def test_make_crops_empty_batch():
    out = make_crops(IMAGE_TASK_SCHEMA.empty_table(), **CROP_ARGS)
    assert out.num_rows == 0
    assert out.schema == CROP_SCHEMA


def test_make_crops_routes_categories_to_experts_at_their_input_size(crop_inputs):
    boxes = [[10, 20, 50, 80], [30, 30, 40, 40], [0, 0, 20, 20]]
    row = task(crop_inputs, "good.png", boxes)
    row["category"] = ["person", "dog", None]
    args = dict(CROP_ARGS, input_sizes={"coco": (192, 256), "ap10k": (256, 256)}, routes={"dog": "ap10k"})
    got = make_crops(pa.Table.from_pylist([row], schema=IMAGE_TASK_SCHEMA), **args).to_pylist()
    assert [r["expert"] for r in got] == ["coco", "ap10k", "coco"]
    assert [len(r["crop"]) for r in got] == [256 * 192 * 3, 256 * 256 * 3, 256 * 192 * 3]


def test_make_crops_passes_an_earlier_stage_failure_and_skips_imageless_boxes(crop_inputs):
    failed = task(crop_inputs, "good.png", [])
    failed.update(error_stage="detect", error_reason="RuntimeError: boom")
    nothing = task(crop_inputs, "good.png", [])  # e.g. the detector found nobody
    got = make_crops(pa.Table.from_pylist([failed, nothing], schema=IMAGE_TASK_SCHEMA), **CROP_ARGS).to_pylist()
    # The image with nothing to label still leaves one empty row, so the writer knows it is done.
    assert [(r["error_stage"], r["error_reason"], r["crop"], r["image_rows"]) for r in got] == [
        ("detect", "RuntimeError: boom", None, 1), (None, None, None, 1)]
