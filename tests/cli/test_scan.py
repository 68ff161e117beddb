"""`reverse-sd scan` and pipeline.image_metadata on real files made in each generator's documented format
(tests/own_images.py), sidecars, images without metadata, and hostile metadata (10 MB text, a zlib bomb,
control characters, broken and deeply nested JSON, a huge ComfyUI graph, a FIFO): each skipped with its
reason, never a hang or a traceback."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
from own_images import (
    a1111_text,
    comfy_two_samplers,
    write_a1111,
    write_comfy,
    write_fooocus,
    write_invokeai,
    write_invokeai_dream,
    write_novelai,
    write_plain,
    write_png,
)

from cli.main import main
from pipeline.image_chunks import MAX_TEXT_BYTES
from pipeline.image_metadata import FIELDS, NO_PROMPT, read_image_metadata

pytestmark = pytest.mark.timeout(120)


def _scan(capsys, *args: str) -> tuple[int, list[dict], str]:
    code = main(["scan", *map(str, args), "--format", "jsonl"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


# ---- each generator ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_a1111_parameters_in_a_png_chunk_and_in_exif_usercomment(tmp_path, suffix):
    record = read_image_metadata(write_a1111(tmp_path / f"a{suffix}", "a red cube on a wooden table", seed=99))
    assert record.as_dict() == {
        "path": str(tmp_path / f"a{suffix}"),
        "generator": "AUTOMATIC1111",
        "prompt": "a red cube on a wooden table",
        "negative_prompt": "blurry, lowres",
        "seed": 99,
        "steps": 20,
        "cfg": 7.0,
        "sampler": "DPM++ 2M Karras",
        "width": 64,
        "height": 64,
        "skipped": None,
    }


def test_a_usercomment_in_little_endian_or_ascii_is_read_too(tmp_path):
    from PIL import Image

    for name, raw in {
        "le.jpg": b"UNICODE\0" + a1111_text("a little endian cube").encode("utf-16-le"),
        "ascii.jpg": b"ASCII\0\0\0" + a1111_text("an ascii cube").encode(),
    }.items():
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = raw
        Image.new("RGB", (32, 16)).save(tmp_path / name, exif=exif.tobytes())
    assert read_image_metadata(tmp_path / "le.jpg").prompt == "a little endian cube"
    ascii_record = read_image_metadata(tmp_path / "ascii.jpg")
    assert (ascii_record.prompt, ascii_record.width, ascii_record.height) == ("an ascii cube", 32, 16)


def test_comfyui_with_two_samplers_keeps_both_prompts_in_node_order(tmp_path):
    record = read_image_metadata(write_comfy(tmp_path / "comfy.png"))
    assert record.generator == "ComfyUI"
    # the distinct positive prompts of all samplers, samplers by node id (3 before 12), joined with ", "
    assert record.prompt == "a red cube on a table, highly detailed"
    assert record.negative_prompt == "blurry"
    assert (record.seed, record.steps, record.cfg, record.sampler) == (42, 20, 8.0, "euler")  # the first sampler's
    assert [(s["id"], s["prompt"], s["seed"]) for s in record.samplers] == [
        ("3", "a red cube on a table", 42),
        ("12", "highly detailed", 43),
    ]


def test_comfyui_api_format_without_workflow_reads_the_same(tmp_path):
    with_workflow = read_image_metadata(write_comfy(tmp_path / "with.png")).as_dict()
    without = read_image_metadata(write_comfy(tmp_path / "without.png", with_workflow=False)).as_dict()
    assert {**without, "path": ""} == {**with_workflow, "path": ""}


def test_comfyui_broken_workflow_falls_back_to_the_prompt_graph(tmp_path):
    prompt, _ = comfy_two_samplers()
    path = write_png(tmp_path / "c.png", {"prompt": json.dumps(prompt), "workflow": "{not json"})
    assert read_image_metadata(path).prompt == "a red cube on a table, highly detailed"


@pytest.mark.parametrize(
    "writer, expected",
    [
        (write_invokeai, ("InvokeAI", "a green sphere in the fog", "text, watermark", 777, 30, 7.5, "dpmpp_2m")),
        (write_invokeai_dream, ("InvokeAI", "a yellow star", "ugly", 9, 50, 7.5, "k_lms")),
        (
            write_novelai,
            ("NovelAI", "1girl, red dress, masterpiece", "lowres, bad anatomy", 3141, 28, 11.0, "k_euler_ancestral"),
        ),
        (write_fooocus, ("Fooocus", "a cozy cabin in the snow", "unrealistic", 1605, 30, 4.0, "dpmpp_2m_sde_gpu")),
    ],
)
def test_invokeai_novelai_fooocus(tmp_path, writer, expected):
    r = read_image_metadata(writer(tmp_path / "x.png"))
    assert (r.generator, r.prompt, r.negative_prompt, r.seed, r.steps, r.cfg, r.sampler) == expected
    assert r.skipped is None and (r.width, r.height) == (64, 64)


def test_invokeai_legacy_sd_metadata(tmp_path):
    meta = {
        "model_weights": "stable-diffusion-1.5",
        "model_hash": "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516",
        "app_id": "invoke-ai/InvokeAI",
        "app_version": "2.2.5",
        "image": {
            "prompt": [{"prompt": "a purple cat [ugly]", "weight": 1.0}],
            "steps": 40,
            "cfg_scale": 7.5,
            "threshold": 0,
            "perlin": 0,
            "height": 64,
            "width": 64,
            "seed": 1111,
            "type": "txt2img",
            "postprocessing": None,
            "sampler": "k_lms",
            "variations": [],
        },
    }
    r = read_image_metadata(write_png(tmp_path / "s.png", {"sd-metadata": json.dumps(meta)}))
    assert (r.generator, r.prompt, r.negative_prompt, r.seed, r.steps) == ("InvokeAI", "a purple cat", "ugly", 1111, 40)


def test_a_parameters_text_without_its_settings_line_is_a_prompt(tmp_path):
    r = read_image_metadata(write_png(tmp_path / "p.png", {"parameters": "just a prompt\nNegative prompt: bad"}))
    assert (r.generator, r.prompt, r.negative_prompt, r.skipped) == ("AUTOMATIC1111", "just a prompt", "bad", None)


# ---- sidecars, no metadata -------------------------------------------------------------------------------


def test_a_txt_sidecar_wins_over_the_embedded_prompt(tmp_path):
    image = write_a1111(tmp_path / "img.png", "the embedded prompt")
    (tmp_path / "img.txt").write_text("a caption from the sidecar\n")
    r = read_image_metadata(image)
    assert (r.generator, r.prompt, r.seed, r.width, r.skipped) == (
        "sidecar",
        "a caption from the sidecar",
        None,
        64,
        None,
    )


def test_a_txt_sidecar_in_a1111_format_and_a_json_sidecar(tmp_path):
    write_plain(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(a1111_text("a prompt in a text file", seed=5))
    write_plain(tmp_path / "b.jpg")
    (tmp_path / "b.json").write_text(json.dumps({"prompt": "from json", "negative_prompt": "n", "seed": 3, "cfg": 6}))
    a, b = read_image_metadata(tmp_path / "a.png"), read_image_metadata(tmp_path / "b.jpg")
    assert (a.generator, a.prompt, a.seed, a.steps) == ("sidecar (AUTOMATIC1111)", "a prompt in a text file", 5, 20)
    assert (b.generator, b.prompt, b.negative_prompt, b.seed, b.cfg) == ("sidecar", "from json", "n", 3, 6.0)


def test_a_broken_json_sidecar_is_a_reason(tmp_path):
    write_a1111(tmp_path / "img.png", "embedded")
    (tmp_path / "img.json").write_text('{"prompt": "unterminated')
    r = read_image_metadata(tmp_path / "img.png")
    assert r.prompt is None and r.skipped.startswith("broken JSON in sidecar img.json")


def test_an_image_without_metadata_is_skipped_with_the_reason(tmp_path):
    r = read_image_metadata(write_plain(tmp_path / "plain.png"))
    assert (r.skipped, r.prompt, r.width) == (NO_PROMPT, None, 64)


# ---- hostile metadata -------------------------------------------------------------------------------------


def _raw_png(path, chunks: list[tuple[bytes, bytes]]):
    """A 1x1 PNG with ``chunks`` before its image data, written by hand (Pillow refuses some of these)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    body = b"".join(chunk(k, d) for k, d in chunks)
    idat = chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + idat + chunk(b"IEND", b""))
    return path


def test_a_10_mb_text_chunk_is_skipped_unread_with_the_reason(tmp_path):
    path = _raw_png(tmp_path / "big.png", [(b"tEXt", b"parameters\0" + b"a" * (10 * 2**20))])
    r = read_image_metadata(path)
    assert r.prompt is None and "above the 2.0 MB limit" in r.skipped and "tEXt" in r.skipped


def test_a_zlib_bomb_stops_at_the_cap(tmp_path):
    bomb = zlib.compress(b"x" * (64 * 2**20), 9)  # 64 MB inflated, about 64 kB stored
    path = _raw_png(tmp_path / "bomb.png", [(b"zTXt", b"parameters\0\0" + bomb)])
    assert f"inflates to more than {MAX_TEXT_BYTES / 2**20:.1f} MB" in read_image_metadata(path).skipped


@pytest.mark.parametrize(
    "texts, reason",
    [
        ({"prompt": "{broken json", "workflow": "{}"}, "broken JSON in the ComfyUI prompt"),
        ({"prompt": "[" * 100_000 + "]" * 100_000}, "nested too deep"),
        ({"invokeai_metadata": "{oops"}, "unreadable prompt metadata"),
        ({"parameters": "p\nSteps: 1, " + "Hashes: {" * 50_000}, "'Hashes:' fields"),
    ],
)
def test_broken_json_and_hostile_text_are_reasons(tmp_path, texts, reason):
    r = read_image_metadata(write_png(tmp_path / "h.png", texts))
    assert r.prompt is None and reason in r.skipped


def test_a_huge_comfyui_graph_is_refused(tmp_path):
    graph = {
        str(i): {"class_type": "KSampler", "inputs": {"steps": 1, "cfg": 1, "sampler_name": "x"}} for i in range(5000)
    }
    r = read_image_metadata(write_png(tmp_path / "g.png", {"prompt": json.dumps(graph), "workflow": "{}"}))
    assert "5,000 nodes" in r.skipped


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"this is not an image", "not a PNG, JPEG or WebP file"),
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0", "truncated file"),
        (b"\xff\xd8\xff\xe1\x00", "truncated file"),
        (b"RIFF\x10\0\0\0WEBPVP8X", "WebP"),
    ],
)
def test_broken_files_are_reasons(tmp_path, content, reason):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    assert reason in read_image_metadata(path).skipped


def test_control_characters_exact_in_jsonl_escaped_in_the_table(tmp_path, capsys):
    hostile = "a cube\x1b]0;owned\x07\x1b[2J\r\u202eevil\nSteps"
    write_png(tmp_path / "ctl\x1b[31m.png", {"parameters": a1111_text(hostile.replace("\nSteps", ""))})
    code, records, _ = _scan(capsys, tmp_path)
    assert code == 0 and records[0]["prompt"] == hostile.replace("\nSteps", "")
    assert main(["scan", str(tmp_path), "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b]0;owned\\x07" in out and "\\u202eevil" in out and "ctl\\x1b[31m.png" in out


# ---- the command -----------------------------------------------------------------------------------------


def test_scan_a_folder_of_every_generator_as_jsonl(tmp_path, capsys):
    write_a1111(tmp_path / "a1111" / "1.png", "a red cube")
    write_a1111(tmp_path / "a1111" / "2.jpg", "a blue cube", colour="blue")
    write_a1111(tmp_path / "a1111" / "3.webp", "a green cube", colour="green")
    write_comfy(tmp_path / "comfy" / "c.png")
    write_invokeai(tmp_path / "invoke" / "i.png")
    write_novelai(tmp_path / "nai" / "n.png")
    write_fooocus(tmp_path / "fooocus" / "f.png")
    write_plain(tmp_path / "plain" / "p.png")
    (tmp_path / "notes.md").write_text("not an image")
    code, records, err = _scan(capsys, tmp_path)
    assert code == 0
    assert all(list(r)[: len(FIELDS)] == list(FIELDS) for r in records)
    by_generator = {}
    for r in records:
        by_generator.setdefault(r["generator"], []).append(r["prompt"])
    assert by_generator == {
        "AUTOMATIC1111": ["a red cube", "a blue cube", "a green cube"],
        "ComfyUI": ["a red cube on a table, highly detailed"],
        "Fooocus": ["a cozy cabin in the snow"],
        "InvokeAI": ["a green sphere in the fog"],
        "NovelAI": ["1girl, red dress, masterpiece"],
        None: [None],
    }
    assert "8 files read" in err and "7 with a prompt" in err and "files/s" in err


def test_a_fifo_and_a_missing_path_are_named_and_exit_1(tmp_path, capsys):
    write_a1111(tmp_path / "ok.png", "fine")
    os.mkfifo(tmp_path / "pipe.png")
    code, records, _ = _scan(capsys, tmp_path, tmp_path / "missing.png")
    reasons = {os.path.basename(r["path"]): r["skipped"] for r in records}
    assert code == 1
    assert reasons["ok.png"] is None and "FIFO" in reasons["pipe.png"] and reasons["missing.png"] == "no such file"


def test_nothing_to_scan_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["scan", str(tmp_path / "empty")]) in (1, 2)
    assert "a folder holding no image file" in capsys.readouterr().out


def test_scan_help_names_the_formats_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    out = capsys.readouterr().out
    assert "--format {table,jsonl}" in out and "examples:" in out and "sidecar" in out
