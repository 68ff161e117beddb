"""Zero-shot CLIP retrieval (`reverse-sd predict --zero-shot`) on the offline twin: a tiny random-init
CLIPModel + CLIPProcessor saved as a local directory and loaded by the hub code path (from_pretrained).
The ranking is CLIP's image-text cosine over the prompt bank, the bank's text embeddings are cached under
the storage root, and the report's baseline row is the top-1 prompt's SBERT cosine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import run_cli, use_home
from environments import sample_env
from PIL import Image

from cli import main as cli
from cli import predict as cli_predict
from pipeline import storage as store
from pipeline import zero_shot as zs
from pipeline.evaluation.report import ZERO_SHOT_KEY, Report
from pipeline.predictor import PredictOptions

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]

PROMPTS = [
    "a red circle on a white background",
    "two blue squares, oil painting",
    "a green triangle, photo",
    "three yellow hexagons, watercolor",
    "a purple star at night",
]


def _write_bank(home: Path, prompts: list[str], seed: int = 0) -> np.ndarray:
    embeddings = np.random.default_rng(seed).normal(size=(len(prompts), 384)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    store.write_parquet(pl.DataFrame({"prompt": prompts, "embedding": embeddings}), home / "prompt_bank.parquet")
    return embeddings


@pytest.fixture(scope="module")
def twin_home(tmp_path_factory) -> Path:
    """A storage root with a prompt bank and the sample profile's CLIP twin where predict looks for it."""
    home = tmp_path_factory.mktemp("zero_shot_home")
    _write_bank(home, PROMPTS)
    zs.save_tiny_clip(zs.twin_directory(str(home)))
    return home


@pytest.fixture()
def twin(twin_home) -> str:
    return zs.twin_directory(str(twin_home))


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    paths = []
    for i, color in enumerate(["red", "blue", "green"]):
        path = tmp_path / "in" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 56), color).save(path)
        paths.append(path)
    return paths


def test_the_twin_loads_through_from_pretrained_and_says_what_it_is(twin):
    clip, processor = zs.load_clip(twin)
    assert type(clip).__name__ == "CLIPModel" and type(processor).__name__ == "CLIPProcessor"
    assert zs.is_twin(twin) and zs.describe(twin) == zs.TWIN_DESCRIPTION
    assert zs.describe("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
    text = zs.text_embeddings(clip, processor, PROMPTS, batch_size=2)  # batches agree with one pass
    assert np.allclose(text, zs.text_embeddings(clip, processor, PROMPTS, batch_size=64), atol=1e-5)
    assert text.shape == (5, 32) and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)


def test_ranking_is_clip_cosine_and_the_bank_cache_is_reused(twin_home, twin, images, tmp_path):
    home = tmp_path / "home"
    bank = _write_bank(home, PROMPTS, seed=3)
    first = zs.ZeroShotRetriever(str(home), twin, device="cpu", batch_size=2)
    cache = Path(zs.cache_path(str(home), twin, first.bank_sha256))
    assert not first.cached and cache.exists() and store.sidecar_path(cache).exists()
    assert first.method == "zero-shot CLIP (tiny random-init CLIP twin)" and first.toy_models

    calls = []
    second = zs.ZeroShotRetriever(str(home), twin, device="cpu", progress=lambda n: calls.append(n))
    assert second.cached and calls == [] and np.array_equal(second.text, first.text)

    # the ranking is the matrix product of unit CLIP image and text embeddings, best first
    pil = [Image.open(p).convert("RGB") for p in images]
    expected = zs.image_embeddings(first.model, first.processor, pil) @ first.text.T
    results = list(first.predict([*images, tmp_path / "missing.png"], PredictOptions(top_k=3)))
    assert [r.path for r in results] == [*images, tmp_path / "missing.png"]
    assert results[-1].error and not results[-1].prompts
    for row, result in zip(expected, results):
        order = np.argsort(-row, kind="stable")[:3]
        assert [p for p, _ in result.prompts] == [PROMPTS[j] for j in order]
        assert [s for _, s in result.prompts] == pytest.approx(row[order].tolist(), abs=1e-5)
        # the predicted SBERT embedding is the top-1 prompt's
        assert np.array_equal(result.embedding, bank[order[0]])

    # the report's figure: mean SBERT cosine of the top-1 prompt to the truth
    targets = bank[[1, 2, 0]]
    best = np.argmax(expected, axis=1)
    assert zs.top1_sbert_cosine(first, pil, targets) == pytest.approx(float((bank[best] * targets).sum(1).mean()))


def test_a_damaged_cache_is_recomputed_and_a_new_bank_gets_its_own(twin, tmp_path):
    home = tmp_path / "home"
    _write_bank(home, PROMPTS)
    first = zs.ZeroShotRetriever(str(home), twin, device="cpu")
    cache = Path(zs.cache_path(str(home), twin, first.bank_sha256))
    cache.write_bytes(cache.read_bytes()[:-8])  # truncated behind the sidecar's back
    again = zs.ZeroShotRetriever(str(home), twin, device="cpu")
    assert not again.cached and np.allclose(again.text, first.text) and store.verify(cache)
    _write_bank(home, [*PROMPTS, "an orange moon"])
    grown = zs.ZeroShotRetriever(str(home), twin, device="cpu")
    assert not grown.cached and grown.text.shape[0] == 6
    assert zs.cache_path(str(home), twin, grown.bank_sha256) != str(cache)
    assert np.allclose(grown.text[:5], first.text, atol=1e-5)


def test_top_k_is_best_first_with_stable_ties():
    scores = np.array([[0.1, 0.5, 0.5, 0.9, 0.2], [1.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    assert zs.top_k(scores, 3).tolist() == [[3, 1, 2], [0, 1, 2]]
    assert zs.top_k(scores, 10).tolist() == np.argsort(-scores, axis=1, kind="stable").tolist()


def test_errors_are_one_line_naming_what_to_do(tmp_path):
    with pytest.raises(zs.ZeroShotError, match=r"no prompt bank under .*--select '\*prompt_bank'"):
        zs.load_bank(str(tmp_path))
    with pytest.raises(zs.ZeroShotError, match="does not hold a CLIPModel") as empty:
        zs.load_clip(str(tmp_path))
    assert "\n" not in str(empty.value)


def test_a_hub_model_offline_fails_in_one_line(twin_home, images, tmp_path):
    """The real hub path with HF_HUB_OFFLINE=1 (read when huggingface_hub is imported, so in a fresh
    process) and a model absent from the local cache: one line saying how to get it."""
    env = sample_env(tmp_path, REVERSE_SD_HOME=str(twin_home), HF_HOME=str(tmp_path / "hf"))
    result = run_cli(["predict", str(images[0]), "--zero-shot", "--clip", "reverse-sd-tests/no-such-clip"], env, 120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load the CLIP model 'reverse-sd-tests/no-such-clip'")
    assert "HF_HUB_OFFLINE=1" in lines[0] and "HF_HUB_OFFLINE=0" in lines[0]


# -- the CLI ------------------------------------------------------------------------------------------------
@pytest.fixture()
def home(twin_home, monkeypatch) -> Path:
    return use_home(monkeypatch, twin_home, HF_HUB_OFFLINE="1")


def test_predict_zero_shot_writes_the_predict_json_lines(home, images, capsys):
    """The sample profile's default --clip is the twin under the storage root; the JSON Lines are those of
    a trained predict: path, model, prompts (prompt + cosine, best first)."""
    code = cli.main(["predict", *map(str, images), "--zero-shot", "--top-k", "2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.err.splitlines()[0] == cli_predict.ZERO_SHOT_TWIN_NOTE
    records = [json.loads(line) for line in out.out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in images]
    for record in records:
        assert set(record) == {"path", "model", "prompts"}
        assert record["model"] == "zero-shot CLIP (tiny random-init CLIP twin)"
        assert len(record["prompts"]) == 2 and {p["prompt"] for p in record["prompts"]} <= set(PROMPTS)
        assert record["prompts"][0]["cosine"] >= record["prompts"][1]["cosine"]
    # --clip takes the directory itself; --embeddings gives the top-1 prompt's 384-d SBERT embedding
    code = cli.main(["predict", str(images[0]), "--zero-shot", "--clip", zs.twin_directory(str(home)), "--embeddings"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and len(record["embedding"]) == 384


def test_predict_zero_shot_errors(home, images, tmp_path, monkeypatch, capsys):
    image = str(images[0])
    cases = [
        (["--zero-shot", "--clip", str(tmp_path)], "cannot load the CLIP model"),
        (["--clip", "openai/clip-vit-large-patch14"], "add --zero-shot"),
        (["--zero-shot", "--model", "vit"], "--zero-shot ranks with --clip"),
        (["--zero-shot", "--generate"], "not with --zero-shot"),
    ]
    for args, message in cases:
        assert cli.main(["predict", image, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setenv("REVERSE_SD_HOME", str(tmp_path / "empty"))
    assert cli.main(["predict", image, "--zero-shot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no prompt bank under") and "materialize --select '*prompt_bank'" in err
    assert not (tmp_path / "empty").exists()  # nothing built before the bank is found


def test_predict_help_documents_zero_shot():
    text = cli.build_parser()._subparsers._group_actions[0].choices["predict"].format_help()
    assert "--zero-shot" in text and "--clip MODEL" in text
    assert "--clip default: openai/clip-vit-large-patch14" in text and "tiny random-init CLIP twin" in text
    assert "reverse-sd predict some/folder --zero-shot" in text and "`" not in text


# -- the report -----------------------------------------------------------------------------------------------
def test_report_has_the_zero_shot_baseline_row():
    cosine = {"baseline/mean_embedding": 0.5, "baseline/knn": 0.55, ZERO_SHOT_KEY: 0.4321987}
    report = Report(profile="sample", split="test", cosine=cosine, zero_shot_model="openai/clip-vit-large-patch14")
    row = report.baseline_records()[-1]
    assert row == {
        "baseline": "zero-shot CLIP retrieval (openai/clip-vit-large-patch14)",
        "test cosine": 0.4322,
        "paper": None,
    }
    assert "| zero-shot CLIP retrieval (openai/clip-vit-large-patch14) | 0.4322 |" in report.markdown()
    assert "zero-shot CLIP retrieval (openai/clip-vit-large-patch14)" in report.html()
    payload = json.loads(report.to_json())
    assert payload["cosine"][ZERO_SHOT_KEY] == 0.4321987 and payload["zero_shot_model"].startswith("openai/")
    without = Report(profile="sample", split="test", cosine={"baseline/mean_embedding": 0.5})
    assert all("zero-shot" not in r["baseline"] for r in without.baseline_records())
    assert "zero-shot" not in without.markdown()
