"""The README's "Python API" example runs as written: its code block, executed in a folder whose ./data is a
tiny storage root (one tiny vit with a vocabulary head, as the ensemble) and which holds image.png."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from conftest import PREDICT_WORDS, write_tiny_predict_home
from PIL import Image

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]

README = Path(__file__).resolve().parents[2] / "README.md"


def python_api_example() -> str:
    """The first ```python block of the README's "## Python API" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)
    assert len(section) == 2, "README.md has no '## Python API' section"
    body = section[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", body, re.S)
    assert match, "the Python API section has no python code block"
    return match.group(1)


def test_the_example_is_five_lines():
    lines = [line for line in python_api_example().splitlines() if line.strip()]
    assert len(lines) == 5, lines


def test_the_readme_example_runs(tmp_path, monkeypatch):
    home = write_tiny_predict_home(tmp_path / "data")
    (home / "models").mkdir()
    (home / "models" / "ensemble.json").write_text(json.dumps({"members": {"vit": "mlc"}}))
    Image.new("RGB", (64, 48), "red").save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_api_example(), str(README), "exec"), {"__name__": "readme_example"})
    prompts, words = out.getvalue().splitlines()
    assert prompts.startswith("[('prompt ") and prompts.count("'prompt ") == 3
    assert words.endswith("(384,)") and any(f"('{w}'," in words for w in PREDICT_WORDS)
