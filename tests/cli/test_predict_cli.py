"""`reverse-sd predict` and the top-level parser as a user meets them: help with defaults and examples,
--version, JSON Lines by default, --output written atomically, Kaggle ids unique, the toy-model note, the
progress bar only on a terminal.  On a storage root holding one tiny model (no materialization)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import polars as pl
import pytest
from conftest import PREDICT_WORDS, use_home, write_tiny_predict_home
from PIL import Image

from cli import main as cli

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]

PROJECT = Path(__file__).resolve().parents[2]
WORDS = PREDICT_WORDS


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory) -> Path:
    return write_tiny_predict_home(tmp_path_factory.mktemp("tiny_home"), seed=1)


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    paths = []
    for i, (folder, color) in enumerate([("a", "red"), ("b", "blue")]):
        path = tmp_path / "in" / folder / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), color).save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def home(tiny_home, monkeypatch) -> Path:
    return use_home(monkeypatch, tiny_home)


def _predict(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["predict", *args, "--model", "vit"])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- the parser ----------------------------------------------------------------------------------------------


def test_version_comes_from_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"reverse-sd {version('reverse-sd')}"


def test_help_shows_defaults_and_examples_without_backticks():
    main_help = cli.build_parser().format_help()
    predict_help = cli.build_parser()._subparsers._group_actions[0].choices["predict"].format_help()
    for text in (main_help, predict_help):
        assert "`" not in text and "examples:" in text
    assert "--version" in main_help and "reverse-sd predict" in main_help
    for default in ("(default: 5)", "(default: jsonl)", "(default: 32)", "(default: auto)", "(default: 8)"):
        assert default in predict_help, default
    assert "(default: None)" not in predict_help and "(default: False)" not in predict_help
    assert "--output FILE" in predict_help and "--embeddings" in predict_help
    from pipeline.inputs import MAX_INPUT_BYTES

    assert f"files over {MAX_INPUT_BYTES // 2**20} MB" in predict_help  # the epilog states the constant


# -- output formats ------------------------------------------------------------------------------------------


def test_jsonl_is_the_default_one_object_per_image(home, images, capsys):
    code, out, err = _predict(capsys, *map(str, images), "--top-k", "3", "--words", "4")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in images]
    for record in records:
        assert set(record) == {"path", "model", "prompts", "words"}
        assert record["model"] == "vit"
        scores = [p["cosine"] for p in record["prompts"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert len(record["words"]) == 4 and {w["word"] for w in record["words"]} <= set(WORDS)
    # embeddings only when asked; json stays one array
    code, out, _ = _predict(capsys, str(images[0]), "--embeddings", "--format", "json")
    assert code == 0
    array = json.loads(out)
    assert isinstance(array, list) and len(array) == 1 and len(array[0]["embedding"]) == 384
    code, out, _ = _predict(capsys, str(images[0]), "--words", "0")
    assert "words" not in json.loads(out)


def test_table_lists_prompts_and_words(home, images, capsys):
    code, out, _ = _predict(capsys, *map(str, images), "--format", "table", "--top-k", "2", "--words", "3")
    assert code == 0
    assert out.count("  1. ") == 2 and out.count("  2. ") == 2 and out.count("  words:  ") == 2


def test_output_file_is_written_atomically(home, images, tmp_path, capsys):
    target = tmp_path / "out" / "predictions.jsonl"
    code, out, err = _predict(capsys, *map(str, images), "--output", str(target))
    assert code == 0 and out == ""
    assert len([json.loads(line) for line in target.read_text().splitlines()]) == 2
    assert f"wrote 2 predictions to {target}" in err
    assert [p.name for p in target.parent.iterdir()] == ["predictions.jsonl"]  # no temporary left
    # a failing run leaves the previous file as it was
    before = target.read_bytes()
    code, _, _ = _predict(capsys, str(tmp_path / "nothing_here.png"), "--output", str(target))
    assert code == 2 and target.read_bytes() == before
    code, _, err = _predict(capsys, str(images[0]), "--output", str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_kaggle_refuses_duplicate_stems_and_writes_unique_ids(home, images, tmp_path, capsys):
    twin = tmp_path / "in" / "b" / images[0].name  # a/img0.png and b/img0.png: one image id twice
    twin.write_bytes(images[0].read_bytes())
    target = tmp_path / "submission.csv"
    code, out, err = _predict(capsys, str(tmp_path / "in"), "--format", "kaggle", "--output", str(target))
    assert code == 2 and out == "" and not target.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(images[0]) in lines[0] and str(twin) in lines[0]
    twin.unlink()
    code, out, err = _predict(capsys, str(tmp_path / "in"), "--format", "kaggle")
    assert code == 0, err
    rows = out.strip().splitlines()
    assert rows[0] == "imgId_eId,val" and len(rows) == 1 + 2 * 384
    ids = [row.split(",")[0] for row in rows[1:]]
    assert len(set(ids)) == len(ids) and ids[0] == "img0_0"


# -- what the user is told -----------------------------------------------------------------------------------


def test_toy_model_note_comes_first(home, images, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    code, _, err = _predict(capsys, str(images[0]), str(broken))
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith("note: these are toy models trained on synthetic images (sample profile")
    assert f"skipped {broken}: not an image" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_when_stderr_is_a_terminal(home, images, capsys, monkeypatch):
    code, out, err = _predict(capsys, *map(str, images))
    assert code == 0 and "image/s" not in err and "%|" not in err  # captured stderr is no terminal
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["predict", *map(str, images), "--model", "vit"]) == 0
    assert "%|" in terminal.getvalue()
    assert len(capsys.readouterr().out.splitlines()) == 2  # stdout holds the records alone
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["predict", *map(str, images), "--model", "vit", "--quiet"]) == 0
    assert "%|" not in terminal.getvalue()


def test_hostile_inputs_are_skipped_by_name_without_hang_or_traceback(tiny_home, images, tmp_path):
    """A FIFO (named, and matched by a glob), a symlink to /dev/zero and a 20 GB sparse file, in a real
    process: each skipped with its reason, the good images predicted, exit status 1."""
    folder = images[0].parent
    os.mkfifo(folder / "pipe.png")
    os.symlink("/dev/zero", folder / "zero.png")
    with open(folder / "sparse.png", "wb") as f:
        f.truncate(20 * 1024**3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVERSE_SD_")}
    env.update(REVERSE_SD_HOME=str(tiny_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "predict",
            str(folder / "*.png"),
            str(folder / "pipe.png"),
            str(images[1]),
            "--model",
            "vit",
            "--format",
            "table",
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert sorted(skipped) == sorted(
        [
            f"skipped {folder / 'pipe.png'}: a FIFO (named pipe), not a regular file",
            f"skipped {folder / 'sparse.png'}: 20,480 MB, above the 100 MB limit for an input image",
            f"skipped {folder / 'zero.png'}: a symlink to /dev/zero, a character device, not a regular file",
        ]
    )
    assert "3 of 5 files skipped" in result.stderr
    assert result.stdout.count("  1. ") == 2


def test_a_damaged_prompt_bank_stops_in_one_line_naming_the_file_and_the_asset(
    tiny_home, images, tmp_path, capsys, monkeypatch
):
    """Bytes flipped inside prompt_bank.parquet used to give cosines like 1e37 with exit 0."""
    import shutil

    from pipeline import storage

    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    bank = home / "prompt_bank.parquet"
    storage.write_parquet(pl.read_parquet(bank), bank)  # as the asset writes it: with its SHA-256 sidecar
    for key in list(os.environ):
        if key.startswith("REVERSE_SD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("REVERSE_SD_HOME", str(home))
    assert _predict(capsys, str(images[0]))[0] == 0
    data = bytearray(bank.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 200] = bytes(b ^ 0x5A for b in data[middle : middle + 200])
    bank.write_bytes(bytes(data))
    code, out, err = _predict(capsys, str(images[0]))
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "prompt_bank.parquet is damaged" in lines[0] and "asset prompt_bank" in lines[0]
    assert "Traceback" not in err
