"""`reverse-sd predict` against hostile inputs, round 3: paths taken literally before globbing, symlink loops
that end, every argument that matched nothing named (issue 27 item 8); control characters escaped in table
output (item 7); an animated GIF read as its first frame, bad arguments answered before the heavy imports, an
unreachable hub failing at once (item 12); a truncated or pickle-only --clip directory refused in one line
(issue 29 item 1)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import run_cli, use_home, write_tiny_predict_home
from PIL import Image

from cli import main as cli
from pipeline.inputs import scan_inputs

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]

PROJECT = Path(__file__).resolve().parents[2]
HOSTILE_PROMPTS = [
    "title \x1b]0;pwned\x07 set",
    "clear \x1b[2J\x1b[H screen",
    "over\rwritten",
    "two\nlines",
    "rtl \u202eevil\u202c text",
    "c1 \x9b31m csi",
]
ESCAPED_PROMPTS = [
    "title \\x1b]0;pwned\\x07 set",
    "clear \\x1b[2J\\x1b[H screen",
    "over\\rwritten",
    "two\\nlines",
    "rtl \\u202eevil\\u202c text",
    "c1 \\x9b31m csi",
]


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory) -> Path:
    """What predict reads (one tiny vit, a vocabulary), a prompt bank of hostile prompts, the CLIP twin."""
    from pipeline import zero_shot as zs

    home = write_tiny_predict_home(tmp_path_factory.mktemp("tiny_home"), seed=1)
    bank = np.random.default_rng(0).normal(size=(len(HOSTILE_PROMPTS), 384)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    pl.DataFrame({"prompt": HOSTILE_PROMPTS, "embedding": bank}).write_parquet(home / "prompt_bank.parquet")
    zs.save_tiny_clip(zs.twin_directory(str(home)))
    return home


@pytest.fixture()
def home(tiny_home, monkeypatch) -> Path:
    return use_home(monkeypatch, tiny_home, HF_HUB_OFFLINE="1")


def _png(path: Path, color="red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), color).save(path)
    return path


def _predict(capsys, *args: str, model: str = "vit") -> tuple[int, str, str]:
    code = cli.main(["predict", *args, *(["--model", model] if model else [])])
    out = capsys.readouterr()
    return code, out.out, out.err


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REVERSE_SD_", "HF_"))}
    env.update({"REVERSE_SD_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


# -- item 8: paths ------------------------------------------------------------------------------------------------


def test_an_existing_path_is_taken_literally_before_globbing(home, tmp_path, capsys):
    brackets = _png(tmp_path / "d" / "a[1].png")
    _png(tmp_path / "d" / "a1.png", "blue")  # what the glob a[1].png would match instead
    question = _png(tmp_path / "d" / "what?.png")
    _png(tmp_path / "d" / "whatX.png", "blue")  # what the glob what?.png would match too
    assert scan_inputs([str(brackets), str(question)]).files == [brackets, question]
    code, out, err = _predict(capsys, str(brackets), str(question))
    assert code == 0, err
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(brackets), str(question)]


def test_a_self_link_gives_one_record_per_real_file(tmp_path):
    image = _png(tmp_path / "d" / "one.png")
    (tmp_path / "d" / "l1").symlink_to(".")
    for argument in (str(tmp_path / "d" / "**" / "*.png"), str(tmp_path / "d"), str(tmp_path / "d" / "*" / "*.png")):
        scan = scan_inputs([argument])
        assert [os.path.realpath(p) for p in scan.files] == [str(image)], argument
    # a file reached through two names is read once
    (tmp_path / "d" / "alias.png").symlink_to("one.png")
    assert len(scan_inputs([str(tmp_path / "d")]).files) == 1


def test_symlink_loops_in_a_recursive_glob_end(tiny_home, tmp_path):
    """Two self-links: glob's ** followed 2^40 paths (a hang with memory growing); here each real folder
    is entered once, in a real process with a timeout."""
    folder = tmp_path / "d"
    image = _png(folder / "sub" / "one.png")
    (folder / "l1").symlink_to(".")
    (folder / "sub" / "l2").symlink_to("..")
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "predict", str(folder / "**" / "*.png"), "--model", "vit"],
        cwd=PROJECT,
        env=_env(tiny_home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [str(image)]


def test_every_argument_that_matched_nothing_is_named(home, tmp_path, capsys):
    good = _png(tmp_path / "good.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    pattern = str(tmp_path / "*.jpg")
    code, out, err = _predict(capsys, str(good), pattern, str(empty))
    assert code == 1 and len(out.splitlines()) == 1
    assert f"skipped {pattern}: matches no file" in err
    assert f"skipped {empty}: a folder holding no image file" in err
    code, out, err = _predict(capsys, pattern)
    assert code == 2 and out == ""
    assert f"skipped {pattern}: matches no file" in err and "error: no image files found" in err


def test_the_walk_is_bounded_in_depth_and_in_files(tmp_path):
    from pipeline.inputs import MAX_WALK_DEPTH

    deep = tmp_path / "deep"
    bottom = deep.joinpath(*[f"d{i}" for i in range(MAX_WALK_DEPTH + 2)])
    _png(bottom / "far.png")
    _png(deep / "near.png")
    scan = scan_inputs([str(deep)])
    assert scan.files == [deep / "near.png"]
    assert [reason for _, reason in scan.skipped] == [
        f"not searched: deeper than {MAX_WALK_DEPTH} folders below the argument"
    ]
    many = tmp_path / "many"
    for i in range(5):
        _png(many / f"{i}.png")
    scan = scan_inputs([str(many)], max_files=3)
    assert len(scan.files) == 3
    assert scan.skipped == [(many, "stopped at 3 files, the limit of one predict")]
    from pipeline.inputs import MAX_INPUT_FILES

    text = cli.build_parser()._subparsers._group_actions[0].choices["predict"].format_help()
    assert f"at most {MAX_WALK_DEPTH} folders deep and {MAX_INPUT_FILES:,} files" in text  # --help states the bounds


# -- item 12: an animated GIF ---------------------------------------------------------------------------------------


def test_an_animated_gif_in_a_folder_is_predicted_from_its_first_frame(home, tmp_path, capsys):
    folder = tmp_path / "gifs"
    first = _png(folder / "first.png", (255, 0, 0))
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    code, out, err = _predict(capsys, str(folder), "--embeddings")
    assert code == 0, err
    records = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    assert set(records) == {"anim.gif", "first.png"}
    np.testing.assert_allclose(records["anim.gif"]["embedding"], records["first.png"]["embedding"], atol=1e-4)
    assert first.exists()


# -- item 7: terminal injection ---------------------------------------------------------------------------------------


def test_printable_escapes_controls_and_keeps_the_rest():
    from pipeline.text_safety import printable

    assert printable("a\x1b]0;t\x07b") == "a\\x1b]0;t\\x07b"
    assert printable("x\ry\nz\tw\x00\x7f\x9b") == "x\\ry\\nz\\tw\\x00\\x7f\\x9b"
    assert printable("rtl \u202eevil\u2066") == "rtl \\u202eevil\\u2066"
    assert printable(os.fsdecode(b"bad\xffname")) == "bad\\xffname"
    kept = "a (masterpiece:1.2), \\(x\\), caf\u00e9, \u732b, \U0001f468\u200d\U0001f469"
    assert printable(kept) == kept
    assert printable(Path("a/b.png")) == "a/b.png"


def _controls(text: str) -> set[str]:
    return {c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F or c in "\u202e\u202c"}


def test_table_output_escapes_prompts_and_file_names_and_json_stays_exact(home, tmp_path, capsys):
    name = "x\x1b[31mred\nline.png"
    image = _png(tmp_path / name)
    broken = tmp_path / "bad\x1b[2J.png"
    broken.write_bytes(b"not an image")
    code, out, err = _predict(capsys, str(image), str(broken), "--format", "table", "--top-k", "6", "--words", "2")
    assert code == 1
    assert not _controls(out) and not _controls(err), (out, err)
    lines = out.splitlines()
    assert len(lines) == 1 + 6 + 1  # the path, six prompts, the words: a newline in a name splits nothing
    assert lines[0].startswith(f"{tmp_path}/x\\x1b[31mred\\nline.png  [vit]")
    assert {line.split("  ", 2)[-1] for line in lines[1:7]} == set(ESCAPED_PROMPTS)
    assert f"skipped {tmp_path}/bad\\x1b[2J.png: not an image" in err
    code, out, _ = _predict(capsys, str(image), "--top-k", "6")
    record = json.loads(out)
    assert record["path"] == str(image) and {p["prompt"] for p in record["prompts"]} == set(HOSTILE_PROMPTS)


# -- item 12: bad arguments before the heavy imports; the hub ------------------------------------------------------------


def _imported_by(args: list[str], env: dict[str, str]) -> tuple[int, list[str], str]:
    """(exit status, which of torch / transformers / dagster the predict run imported, stderr)."""
    probe = (
        "import sys\nfrom cli.main import main\ncode = main(sys.argv[1:])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'dagster') if m in sys.modules))\nsys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120
    )
    return result.returncode, json.loads(result.stdout.strip().replace("'", '"')), result.stderr


def test_bad_arguments_are_reported_before_torch_is_imported(tiny_home, tmp_path):
    image = str(_png(tmp_path / "x.png"))
    code, modules, err = _imported_by(["predict", image, "--model", "nosuch"], _env(tiny_home))
    assert code == 2 and modules == [] and err.startswith("error: --model 'nosuch' is not a model")
    code, modules, err = _imported_by(["predict", image, "--clip", "x"], _env(tiny_home))
    assert code == 2 and modules == [] and "add --zero-shot" in err
    truncated = tmp_path / "truncated_clip"
    shutil.copytree(Path(tiny_home) / "zero_shot" / "tiny_clip", truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:1000])
    code, modules, err = _imported_by(["predict", image, "--zero-shot", "--clip", str(truncated)], _env(tiny_home))
    assert code == 2 and "torch" not in modules and "transformers" not in modules, modules
    assert "is not a whole safetensors file" in err and err.count("\n") == 1, err
    for extra in ([], ["--zero-shot"]):
        code, modules, err = _imported_by(["predict", image, *extra], _env(tmp_path / "no_home"))
        assert code == 2 and "torch" not in modules and "transformers" not in modules, modules
        assert err.startswith("error: no prompt bank under") and err.count("\n") == 1, err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _predict_with_the_hub_unreachable(
    tiny_home: Path, tmp_path: Path, clip: str, timeout: int
) -> subprocess.CompletedProcess:
    """predict --zero-shot --clip ``clip`` on one image, HF_HUB_OFFLINE unset, the hub a closed port and the
    Hugging Face cache tmp_path/hf."""
    env = _env(
        tiny_home, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf")
    )
    image = str(_png(tmp_path / "x.png"))
    return run_cli(["predict", image, "--zero-shot", "--clip", clip], env, timeout=timeout)


def test_a_hub_model_with_the_hub_unreachable_fails_at_once_in_one_line(tiny_home, tmp_path):
    """HF_HUB_OFFLINE unset and no hub: huggingface_hub retried each file with backoff (225 s, 45 "Retrying"
    lines); now one request, then the local cache alone."""
    result = _predict_with_the_hub_unreachable(tiny_home, tmp_path, "reverse-sd-tests/no-such", timeout=150)
    assert result.returncode == 2 and result.stdout == ""
    assert "Retrying" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: cannot load the CLIP model 'reverse-sd-tests/no-such' (the hub cannot be reached and it is not "
        "in the local Hugging Face cache; --clip takes a local directory)"
    ]


# -- issue 29 item 1: a --clip directory that must not load -------------------------------------------------------------


class _Payload:
    """A pickle that, when loaded, creates ``marker``: it must never be loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_truncated_or_pickle_only_clip_directory_is_refused_in_one_line(home, tmp_path, capsys):
    from pipeline import zero_shot as zs

    image = str(_png(tmp_path / "x.png"))
    truncated = tmp_path / "truncated"
    shutil.copytree(zs.twin_directory(str(home)), truncated)
    weights = truncated / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, out, err = _predict(capsys, image, "--zero-shot", "--clip", str(truncated), model="")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: {weights} is not a whole safetensors file: {len(data) // 2:,} bytes where its header describes "
        f"{len(data):,} (truncated or damaged: download or save it again)"
    ]
    pickled = tmp_path / "pickled"
    shutil.copytree(zs.twin_directory(str(home)), pickled)
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    code, out, err = _predict(capsys, image, "--zero-shot", "--clip", str(pickled), model="")
    assert code == 2 and out == "" and not marker.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "only a pickle checkpoint (pytorch_model.bin), which is never loaded" in lines[0]


def test_a_cached_hub_model_with_the_hub_unreachable_loads_from_the_cache_at_once(tiny_home, tmp_path):
    """The same unreachable hub, the model in the local Hugging Face cache: used from there, no retries."""
    from pipeline import zero_shot as zs

    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--reverse-sd-tests--cached-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(zs.twin_directory(str(tiny_home)), repo / "snapshots" / revision)
    result = _predict_with_the_hub_unreachable(tiny_home, tmp_path, "reverse-sd-tests/cached-clip", timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Retrying" not in result.stderr
    assert json.loads(result.stdout)["model"] == "zero-shot CLIP (reverse-sd-tests/cached-clip)"
