"""Wrong settings fail at start with one line naming the setting; and the safety rules hold.

Settings are met through the CLI, so they are tested there, in subprocesses: a non-zero exit status,
no Python traceback, and stderr's last line naming the setting.  The subprocesses run side by side
(a module fixture) because most of their time is importing.  The safety checks read the source (no
unpickling anywhere), the resources and a real run's output and instance (the hub token never appears),
and the Makefile (the UI binds 127.0.0.1 unless told otherwise).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from environments import sample_env

from pipeline.training.checkpoint import CheckpointError, load_model_weights, save_checkpoint
from pipeline.training.resume import load_checkpoint

PROJECT = Path(__file__).resolve().parents[2]
SECRET = "hf_kIlLrEsUmEsEcReT0123456789abcdef"  # a token-shaped value that must never be written anywhere


def _bad_checkpoint_home(root: Path) -> Path:
    """A storage root with a prompt bank and a vit checkpoint whose head is 512-d while its metadata says 384."""
    from safetensors.torch import save_file

    from pipeline.models import create_model

    home = root / "home"
    home.mkdir()
    bank = np.eye(3, 384, dtype=np.float32)
    pl.DataFrame({"prompt": ["a", "b", "c"]}).with_columns(
        pl.Series("embedding", bank, dtype=pl.Array(pl.Float32, 384))
    ).write_parquet(home / "prompt_bank.parquet")
    model = create_model("vit", variant="tiny", vocab_size=0, embed_dim=512)
    config = {**model.config_dict(), "embed_dim": 384}  # the metadata lies; the tensors do not
    directory = home / "trained_models" / "vit" / "baseline"
    directory.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(directory / "ckpt-00001.safetensors"),
        metadata={"model_config": json.dumps(config), "embedding_dim": "384"},
    )
    return directory / "ckpt-00001.safetensors"


def _cases(tmp: Path) -> dict[str, tuple[dict[str, str], list[str], list[str]]]:
    """name -> (environment changes, CLI arguments, words stderr's last line must contain)."""
    (tmp / "a_file").write_text("not a directory")
    (tmp / "not_a_mirror" / "images").mkdir(parents=True)
    (tmp / "not_a_mirror" / "images" / "part-1.zip").write_bytes(b"")  # not part-NNNNNN: not DiffusionDB's layout
    (tmp / "image.png").write_bytes(b"")
    checkpoint = _bad_checkpoint_home(tmp)
    image = str(tmp / "image.png")
    return {
        "unknown profile": ({"REVERSE_SD_PROFILE": "nosuch"}, ["materialize"], ["REVERSE_SD_PROFILE", "'nosuch'"]),
        "unknown profile (predict)": ({"REVERSE_SD_PROFILE": "Sample "}, ["predict", image], ["REVERSE_SD_PROFILE"]),
        "missing mirror": (
            {"REVERSE_SD_DIFFUSIONDB": str(tmp / "no" / "such" / "mirror")},
            ["materialize"],
            ["REVERSE_SD_DIFFUSIONDB", "does not exist"],
        ),
        "mirror is a file": (
            {"REVERSE_SD_DIFFUSIONDB": str(tmp / "a_file")},
            ["materialize"],
            ["REVERSE_SD_DIFFUSIONDB"],
        ),
        "mirror without DiffusionDB's layout": (
            {"REVERSE_SD_DIFFUSIONDB": str(tmp / "not_a_mirror")},
            ["materialize", "--select", "diffusiondb_parts"],
            ["REVERSE_SD_DIFFUSIONDB", "images/part-NNNNNN.zip"],
        ),
        "unwritable storage root": (
            {"REVERSE_SD_HOME": str(tmp / "a_file" / "data")},
            ["materialize"],
            ["REVERSE_SD_HOME", "not writable"],
        ),
        "unwritable Dagster instance": (
            {"DAGSTER_HOME": str(tmp / "a_file" / "dh")},
            ["materialize"],
            ["DAGSTER_HOME"],
        ),
        "sample size not a number": ({"REVERSE_SD_SAMPLE_PARTS": "two"}, ["materialize"], ["REVERSE_SD_SAMPLE_PARTS"]),
        "cron expression out of range": (
            {"REVERSE_SD_OBSERVE_CRON": "99 99 99 99 99"},
            ["materialize"],
            ["REVERSE_SD_OBSERVE_CRON", "minute 99 is out of 0-59"],
        ),
        "unknown storage scheme": (
            {"REVERSE_SD_HOME": "foo://bar"},
            ["materialize"],
            ["REVERSE_SD_HOME", "'foo'", "file"],
        ),
        "in-process storage root": (
            {"REVERSE_SD_HOME": "memory://bucket/home"},
            ["materialize"],
            ["REVERSE_SD_HOME", "memory"],
        ),
        "hub source offline": (
            {"REVERSE_SD_DIFFUSIONDB": "not/a-real-repo", "HF_HUB_OFFLINE": "1"},
            ["materialize"],
            ["REVERSE_SD_DIFFUSIONDB", "HF_HUB_OFFLINE", "local DiffusionDB mirror directory"],
        ),
        "unknown captioner": (
            {"REVERSE_SD_CAPTIONERS": "blip, pez"},
            ["materialize"],
            ["REVERSE_SD_CAPTIONERS", "pez", "blip2"],
        ),
        "unknown asset": ({}, ["materialize", "--select", "nosuch_asset+"], ["--select", "nosuch_asset"]),
        "unknown backbone": ({}, ["predict", image, "--model", "nosuch"], ["--model", "'nosuch'", "vit"]),
        "unknown captioner (predict)": (
            {},
            ["predict", image, "--captioner", "pez"],
            ["--captioner", "'pez'", "blip2"],
        ),
        "wrong embedding size in a checkpoint": (
            {"REVERSE_SD_HOME": str(checkpoint.parents[3])},
            ["predict", image, "--model", "vit"],
            [str(checkpoint), "512", "384"],
        ),
    }


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300
    )


def _base_env(tmp: Path) -> dict[str, str]:
    return sample_env(tmp, REVERSE_SD_SAMPLE_PARTS="1", REVERSE_SD_SAMPLE_IMAGES_PER_PART="3", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every wrong-setting case, plus one good run with HF_TOKEN set, run side by side."""
    tmp = tmp_path_factory.mktemp("settings")
    base = _base_env(tmp)
    cases = _cases(tmp)
    token_root = tmp / "token_run"
    jobs = {name: ({**base, **changes}, args) for name, (changes, args, _) in cases.items()}
    jobs["token run"] = (
        {
            **base,
            "HF_TOKEN": SECRET,
            "REVERSE_SD_HOME": str(token_root / "data"),
            "DAGSTER_HOME": str(token_root / "dh"),
        },
        ["materialize", "--select", "diffusiondb_parts"],
    )
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_cli, args, env) for name, (env, args) in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    return cases, results, token_root


CASE_NAMES = [
    "unknown profile",
    "unknown profile (predict)",
    "missing mirror",
    "mirror is a file",
    "mirror without DiffusionDB's layout",
    "unwritable storage root",
    "unwritable Dagster instance",
    "sample size not a number",
    "cron expression out of range",
    "unknown storage scheme",
    "in-process storage root",
    "hub source offline",
    "unknown captioner",
    "unknown asset",
    "unknown backbone",
    "unknown captioner (predict)",
    "wrong embedding size in a checkpoint",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_wrong_setting_fails_at_start_with_one_line_naming_it(cli_runs, name):
    cases, results, _ = cli_runs
    result = results[name]
    words = cases[name][2]
    assert result.returncode not in (0, 1), (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), last
    assert all(word in last for word in words), (words, last)
    assert "materialized" not in result.stdout  # it failed at start: nothing ran


def test_case_list_is_complete(cli_runs):
    assert sorted(CASE_NAMES) == sorted(cli_runs[0])


# -- the same errors in the library ----------------------------------------------------------------------


def test_backbone_given_as_a_path_is_refused_before_any_path_is_built(capsys, tmp_path):
    """--model becomes a directory name under the storage root: only registered names get that far."""
    from cli.main import main

    assert main(["predict", str(tmp_path / "x.png"), "--model", "../../etc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --model '../../etc' is not a model; use one of: auto, ensemble, clip, swin, unet, vit"]


def test_unknown_backbone_names_the_valid_ones():
    from pipeline.models import create_model

    with pytest.raises(ValueError, match=r"unknown backbone 'nosuch'; valid backbones: clip, swin, unet, vit"):
        create_model("nosuch")


def test_checkpoint_whose_tensors_contradict_its_metadata(tmp_path):
    path = _bad_checkpoint_home(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model_weights(path)
    assert str(err.value) == f"checkpoint embedding size 512 != expected 384 ({path})"


def test_checkpoint_that_does_not_fit_the_model_is_one_line(tmp_path):
    from pipeline.models import create_model

    save_checkpoint(tmp_path, create_model("vit", variant="tiny", vocab_size=7), index=1)
    other = create_model("vit", variant="tiny", vocab_size=9)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, other)
    message = str(err.value)
    assert "\n" not in message and "ckpt-00001.safetensors" in message
    assert re.search(r"heads\.vocabulary\.linear\.(weight|bias) has shape \[7\b.*expects \[9\b", message), message


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_unreadable_checkpoint_file_is_a_checkpoint_error(tmp_path, damage):
    from pipeline.models import create_model

    path = save_checkpoint(tmp_path, create_model("vit", variant="tiny", vocab_size=0), index=1)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_model_weights(path)


# -- safety ----------------------------------------------------------------------------------------------

UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """Calls that can unpickle: torch.load without weights_only=True, pickle-family loads, numpy's
    allow_pickle=True, pandas' read_pickle, and any import of a pickle-family module."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where} imports {n}" for n in names if n.split(".")[0] in UNPICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if func.endswith("torch.load") or func == "load" and "weights_only" in kwargs:
            value = kwargs.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{where} {func} without weights_only=True")
        if func.endswith(("read_pickle", "jit.load")):
            found.append(f"{where} {func}")
        value = kwargs.get("allow_pickle")
        if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
            found.append(f"{where} {func}(allow_pickle=...)")
    return found


def test_the_unpickling_check_finds_what_it_looks_for():
    bad = (
        "import torch, pickle\nimport numpy as np\nfrom joblib import load\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "import pandas as pd\npd.read_pickle('p')\n"
    )
    assert len(unsafe_loads(bad)) == 6
    assert unsafe_loads("import torch\ntorch.load(f, map_location='cpu', weights_only=True)\n") == []


def test_nothing_unpickles():
    files = [p for d in ("pipeline", "assets", "resources") for p in sorted((PROJECT / d).rglob("*.py"))]
    assert len(files) > 10
    found = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(PROJECT)))]
    assert found == []


def test_hub_token_comes_from_the_environment_and_is_never_shown(monkeypatch, tmp_path):
    import dagster as dg

    from resources import build_resources, load_settings

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("REVERSE_SD_HOME", str(tmp_path))
    resources = build_resources(load_settings())
    token = resources["diffusiondb"].token
    assert isinstance(token, dg.EnvVar) and token.env_var_name == "HF_TOKEN"  # the variable, not its value
    assert SECRET not in repr(resources) and SECRET not in str(resources)
    monkeypatch.delenv("HF_TOKEN")
    assert build_resources(load_settings())["diffusiondb"].token is None


def test_hub_token_never_reaches_output_artifacts_or_the_instance(cli_runs):
    _, results, root = cli_runs
    result = results["token run"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"materialized 1 (asset )?runs?\b", result.stdout), result.stdout[-2000:]  # either wording
    assert SECRET not in result.stdout and SECRET not in result.stderr
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".db") for p in files)  # the run was recorded in the instance's storage
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []


def _ui_command(**env: str) -> str:
    """What `make ui` would run, with the shell's defaults applied and the server replaced by echo."""
    plan = subprocess.run(["make", "-n", "ui"], cwd=PROJECT, capture_output=True, text=True, check=True).stdout
    [line] = [line for line in plan.splitlines() if " dev " in line and "dagster" in line]
    clean = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")}
    return subprocess.run(
        ["bash", "-c", "echo " + line.split(" dev ", 1)[1]], env={**clean, **env}, capture_output=True, text=True
    ).stdout.strip()


def test_ui_binds_localhost_unless_told():
    assert _ui_command() == f"-w {PROJECT}/workspace.yaml -h 127.0.0.1 -p 3000"
    assert _ui_command(HOST="0.0.0.0", PORT="3001") == f"-w {PROJECT}/workspace.yaml -h 0.0.0.0 -p 3001"
    for name in ("dagster.yaml", "workspace.yaml"):
        assert "0.0.0.0" not in (PROJECT / name).read_text()
