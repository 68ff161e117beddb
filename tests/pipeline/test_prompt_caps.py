"""Bounded prompts: the reader cuts a prompt over MAX_PROMPT_CHARS (record kept, the cut counted), refuses a
part JSON over MAX_JSON_BYTES in one line naming the limit, and the encoder never tokenises more than the cap."""

from __future__ import annotations

import json
import logging
import zipfile

import numpy as np
import pytest
from test_diffusiondb_reader import PART, _entry, _png, _write_zip

from pipeline.data.diffusiondb import MAX_JSON_BYTES, MAX_PROMPT_CHARS, CorruptArchiveError, cap_prompt, read_part

WORDS = "a portrait of an old fisherman by the sea, highly detailed digital painting, artstation, 8k "


def test_a_huge_prompt_is_cut_counted_and_its_record_kept(tmp_path):
    huge = WORDS * 12_000  # about 1 MB
    entries = {"big.png": _entry(huge), "small.png": _entry("a red cube")}
    members = [("big.png", _png()), ("small.png", _png()), (f"{PART}.json", json.dumps(entries).encode())]
    result = read_part(_write_zip(tmp_path / f"{PART}.zip", members), PART, image_size=32)
    prompts = dict(zip(result.frame["image_id"], result.frame["prompt"]))
    assert prompts["small.png"] == "a red cube"
    assert MAX_PROMPT_CHARS - 256 <= len(prompts["big.png"]) <= MAX_PROMPT_CHARS
    assert huge.startswith(prompts["big.png"]) and not prompts["big.png"].endswith(("fisherm", "portra"))
    assert result.skipped == []  # kept, not skipped
    assert result.counts == {"prompt_truncated": 1}
    assert result.truncated == [{"id": "big.png", "chars": len(huge)}]


def test_cap_prompt_cuts_at_a_word_boundary_or_exactly_at_the_limit():
    assert cap_prompt("short") == "short"
    assert cap_prompt("x" * 10_000) == "x" * MAX_PROMPT_CHARS  # no whitespace near the end: a hard cut
    cut = cap_prompt("word " * 2000)
    assert len(cut) <= MAX_PROMPT_CHARS and cut.endswith("word")


def test_a_part_json_over_the_limit_fails_the_part_naming_the_limit(tmp_path):
    payload = b'{"a.png": {"p": "' + b" " * (MAX_JSON_BYTES + 10) + b'"}}'  # compresses to almost nothing
    path = tmp_path / f"{PART}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", _png())
        zf.writestr(f"{PART}.json", payload)
    with pytest.raises(CorruptArchiveError) as error:
        read_part(path, PART)
    message = str(error.value)
    assert PART in message and f"{MAX_JSON_BYTES:,}-byte limit" in message and "\n" not in message
    assert MAX_JSON_BYTES <= 64 << 20


@pytest.fixture(scope="module")
def encoder():
    from pipeline.data.prompt_encoder import PromptEncoder

    return PromptEncoder(device="cpu")


def test_the_encoder_cuts_a_huge_prompt_and_counts_it(encoder, caplog):
    huge = WORDS * 50_000  # about 4.5 MB
    head = huge[:20_000]  # far more than the 256 word pieces the model reads
    before = encoder.truncated
    with caplog.at_level(logging.WARNING, logger="pipeline.data.prompt_encoder"):
        vectors = encoder.encode([huge, "a red cube"])
    assert encoder.truncated == before + 1
    assert any("1 prompt over 4,096 characters" in r.getMessage() for r in caplog.records)
    reference = encoder.sentence_transformer.encode([head], normalize_embeddings=True)
    assert float(np.dot(vectors[0], reference[0])) > 0.9999  # the cut loses nothing the model reads
