"""What `reverse-sd predict` reads: only regular files within a size cap (FIFOs, devices, sockets, symlinks to
them and huge files are skipped by name, never opened or read), and every image through the one opening
function (pixel limit first, EXIF orientation, the path in every message).  Small files, no training."""

from __future__ import annotations

import io
import os
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import PREDICT_WORDS, write_tiny_predict_home
from PIL import Image

from pipeline.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, open_image, reencode
from pipeline.inputs import (
    MAX_INPUT_BYTES,
    InputError,
    check_input_file,
    duplicate_stems,
    expand_inputs,
    read_input_file,
    scan_inputs,
)
from pipeline.predictor import PredictOptions, PromptPredictor

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(120)]

WORDS = PREDICT_WORDS


def _png(size=(32, 32), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _rotated_jpeg() -> bytes:
    """40 x 20 pixels stored, blue top-left corner, EXIF Orientation 6: shown 20 x 40, the blue corner top-right."""
    img = Image.new("RGB", (40, 20), "red")
    img.paste((0, 0, 255), (0, 0, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture()
def hostile(tmp_path) -> dict[str, Path]:
    """A folder of good and hostile '.png' inputs: a FIFO, a symlink to /dev/zero, a 20 GB sparse file."""
    folder = tmp_path / "in"
    folder.mkdir()
    paths = {
        "good": folder / "good.png",
        "fifo": folder / "pipe.png",
        "zero": folder / "zero.png",
        "sparse": folder / "sparse.png",
        "broken": folder / "broken.png",
    }
    paths["good"].write_bytes(_png())
    os.mkfifo(paths["fifo"])
    os.symlink("/dev/zero", paths["zero"])
    with open(paths["sparse"], "wb") as f:
        f.truncate(20 * 1024**3)  # sparse: no disk used, 20 GB of zeros to a reader
    os.symlink(folder / "nowhere.png", paths["broken"])
    return paths


# -- the file check ----------------------------------------------------------------------------------------


def test_size_cap_is_a_named_constant_of_100_mb():
    assert MAX_INPUT_BYTES == 100 * 1024 * 1024


def test_check_refuses_fifo_device_symlink_sparse_and_missing(hostile):
    started = time.perf_counter()
    check_input_file(hostile["good"])
    reasons = {}
    for name in ("fifo", "zero", "sparse", "broken"):
        with pytest.raises(InputError) as info:
            check_input_file(hostile[name])
        reasons[name] = str(info.value)
    assert "FIFO" in reasons["fifo"] and "not a regular file" in reasons["fifo"]
    assert reasons["zero"] == "a symlink to /dev/zero, a character device, not a regular file"
    assert "20,480 MB" in reasons["sparse"] and "100 MB limit" in reasons["sparse"]
    assert reasons["broken"] == "a broken symlink"
    with pytest.raises(InputError, match="no such file"):
        check_input_file(hostile["good"].with_name("missing.png"))
    assert time.perf_counter() - started < 5


def test_check_refuses_a_socket(tmp_path):
    path = tmp_path / "s.png"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        with pytest.raises(InputError, match="a socket, not a regular file"):
            check_input_file(path)
    finally:
        server.close()


def test_read_never_blocks_nor_reads_past_the_cap(hostile, tmp_path):
    assert read_input_file(hostile["good"]) == hostile["good"].read_bytes()
    for name in ("fifo", "zero", "sparse"):
        with pytest.raises(InputError):
            read_input_file(hostile[name])
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2000)
    with pytest.raises(InputError, match="1,000 bytes limit"):
        read_input_file(big, max_bytes=1000)


def test_folders_globs_and_explicit_paths_go_through_the_same_check(hostile):
    folder = hostile["good"].parent
    by_folder = scan_inputs([str(folder)])
    by_glob = scan_inputs([str(folder / "*.png")])
    explicit = scan_inputs([str(p) for p in hostile.values()])
    for scan in (by_folder, by_glob, explicit):
        assert scan.files == [hostile["good"]]
        assert {p.name for p, _ in scan.skipped} == {"pipe.png", "zero.png", "sparse.png", "broken.png"}
    # expand_inputs keeps its contract: the files to read, nothing else
    assert expand_inputs([str(folder), str(hostile["good"])]) == [hostile["good"]]


def test_duplicate_stems_are_found(tmp_path):
    a, b, c = tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg", tmp_path / "y.png"
    assert duplicate_stems([a, b, c]) == {"x": [a, b]}
    assert duplicate_stems([a, c]) == {}


# -- the one image-opening function ------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    img = open_image(_rotated_jpeg(), "photo.jpg")
    assert img.size == (20, 40)
    r, g, b = img.getpixel((15, 2))
    assert b > 200 and r < 50  # the blue corner, now top-right
    _, width, height = reencode(_rotated_jpeg(), size=16)
    assert (width, height) == (20, 40)


def test_training_decode_applies_exif_orientation_too():
    from pipeline.training.datasets import image_tensor

    pixels = image_tensor(_rotated_jpeg(), (40, 20), (0, 0, 0), (1, 1, 1))  # (H, W) as stored upright
    assert tuple(pixels.shape) == (3, 40, 20)
    assert pixels[2, 2, 15] > 0.8 and pixels[0, 2, 15] < 0.2


def test_our_pixel_limit_fires_first_with_our_words_and_the_path():
    for side in (8000, 30000):  # below and far above Pillow's own bomb error (~179M pixels)
        with pytest.raises(ImageError) as info:
            open_image(_png_header(side, side), "huge.png")
        assert info.value.reason == "too_large"
        message = str(info.value)
        assert message.startswith("huge.png: image declares ")
        assert f"{side * side:,} pixels" in message and f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in message
        assert "DOS attack" not in message  # Pillow's wording


def test_messages_name_the_path_never_a_buffer():
    for data in (b"not an image at all", _png()[:60], b"\x89PNG\r\n\x1a\n" + b"x" * 40):
        with pytest.raises(ImageError) as info:
            open_image(data, "dir/broken.png")
        assert str(info.value).startswith("dir/broken.png: ")
        assert "BytesIO" not in str(info.value) and "0x" not in str(info.value)
    with pytest.raises(ImageError, match="^x.png: zero-byte image$"):
        open_image(b"", "x.png")


def test_parts_reader_names_the_archive_member(tmp_path):
    """read_part goes through the same function: a bomb in an archive is counted as image_too_large."""
    import json
    import zipfile

    from pipeline.data.diffusiondb import read_part

    archive = tmp_path / "part-000001.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.png", _png())
        zf.writestr("bomb.png", _png_header(30000, 30000))
        zf.writestr("turned.jpg", _rotated_jpeg())
        entries = {
            n: {"p": "a prompt", "se": 1, "c": 7.0, "st": 50, "sa": "k_lms"}
            for n in ("ok.png", "bomb.png", "turned.jpg")
        }
        zf.writestr("part-000001.json", json.dumps(entries))
    result = read_part(archive, "part-000001", image_size=16)
    assert result.counts == {"image_too_large": 1}
    sizes = dict(zip(result.frame["image_id"], zip(result.frame["width"], result.frame["height"])))
    assert sizes["turned.jpg"] == (20, 40)


# -- the predictor over hostile inputs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory) -> Path:
    return write_tiny_predict_home(tmp_path_factory.mktemp("tiny_home"), seed=0)


def test_predictor_skips_hostile_inputs_and_keeps_the_good_one(tiny_home, hostile):
    predictor = PromptPredictor(str(tiny_home), model="vit", device="cpu", batch_size=2)
    assert predictor.toy_models and predictor.vocabulary == WORDS
    bad = hostile["good"].with_name("bad.png")
    bad.write_bytes(b"not an image")
    started = time.perf_counter()
    results = list(predictor.predict([*hostile.values(), bad], PredictOptions(top_k=3, words=4)))
    assert time.perf_counter() - started < 30
    assert [r.path for r in results] == [*hostile.values(), bad]
    good = results[0]
    assert good.error is None and good.embedding.shape == (384,)
    assert len(good.prompts) == 3 and [s for _, s in good.prompts] == sorted((s for _, s in good.prompts), reverse=True)
    assert len(good.words) == 4 and {w for w, _ in good.words} <= set(WORDS)
    assert all(0.0 <= p <= 1.0 for _, p in good.words)
    errors = {r.path.name: r.error for r in results[1:]}
    assert all(errors.values()) and "BytesIO" not in errors["bad.png"]
    assert errors["bad.png"].startswith("not an image")
    # the older tuple interface reads the same way
    tuples = list(predictor.predict_files([hostile["good"], hostile["fifo"]]))
    assert np.allclose(tuples[0][1], good.embedding) and tuples[1][1] is None and "FIFO" in tuples[1][2]
