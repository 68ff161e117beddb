"""pipeline.data.vocabulary: content words only, document-frequency top-K with deterministic ties, and labels
that are exactly the vocabulary words each prompt contains."""

from __future__ import annotations

import random
import re
import warnings

import numpy as np
import polars as pl
import pytest
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from pipeline.data.vocabulary import build_vocabulary, label_indices, label_series, multi_hot

PROMPTS = [
    "a red cat and a red dog, 4k",
    "The red car, 8k, trending on artstation",
    "blue cat by greg rutkowski",
    "cat 3d render, octane-render, v5",
    "portrait of a cat's face, highly detailed",
    "",
]


def test_stop_words_numbers_and_mixed_tokens_are_dropped():
    words = set(build_vocabulary(PROMPTS, k=1000)["word"])
    assert not words & ENGLISH_STOP_WORDS
    assert all(re.fullmatch(r"[a-z]{2,}", w) for w in words)
    assert {"4k", "8k", "3d", "v5", "the", "and", "of", "by", "on", "a", "s"}.isdisjoint(words)
    assert {"octane", "render", "rutkowski", "artstation", "cat"} <= words  # split on punctuation, lower-cased


def test_top_k_by_document_frequency_with_alphabetical_ties():
    vocab = build_vocabulary(PROMPTS, k=4)
    assert vocab.schema == pl.Schema({"index": pl.Int32, "word": pl.String, "count": pl.Int64})
    # cat in 4 prompts; red in 2 prompts (3 occurrences: document frequency, not term frequency);
    # render appears twice in one prompt -> 1; ties at 1 broken alphabetically
    assert vocab["word"].to_list() == ["cat", "red", "artstation", "blue"]
    assert vocab["count"].to_list() == [4, 2, 1, 1]
    assert vocab["index"].to_list() == [0, 1, 2, 3]


def test_vocabulary_is_independent_of_prompt_order():
    shuffled = PROMPTS[:]
    random.Random(0).shuffle(shuffled)
    assert build_vocabulary(shuffled, k=6).equals(build_vocabulary(PROMPTS, k=6))
    assert build_vocabulary(pl.Series(PROMPTS), k=6).equals(build_vocabulary(PROMPTS, k=6))


def test_no_content_words_is_an_error():
    with pytest.raises(ValueError):
        build_vocabulary(["the and of", "4k 8k", ""], k=10)


def test_labels_are_the_vocabulary_words_each_prompt_contains():
    rng = random.Random(1)
    pool = ["red", "cat", "blue", "dog", "the", "4k", "Octane", "render", "by", "greg", "rutkowski", "castle"]
    train = [" ".join(rng.choices(pool, k=rng.randint(1, 8))) for _ in range(300)]
    vocab = build_vocabulary(train, k=5)
    words = vocab["word"].to_list()
    test = [" ".join(rng.choices(pool, k=rng.randint(0, 8))) for _ in range(200)] + [None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = label_indices(test, vocab)
        series = label_series(test, vocab)
    assert len(labels) == len(test) == series.len()
    assert series.dtype == pl.List(pl.Int32)
    for text, idx, row in zip(test, labels, series.to_list()):
        tokens = set(re.findall(r"[a-z]+", (text or "").lower()))
        expected = sorted(i for i, w in enumerate(words) if w in tokens)
        assert idx.dtype == np.int32
        assert idx.tolist() == expected == row
        assert all(0 <= i < len(words) for i in idx)


def test_multi_hot():
    dense = multi_hot([np.array([0, 2], dtype=np.int32), np.array([], dtype=np.int32)], k=3)
    assert dense.dtype == np.float32
    assert dense.tolist() == [[1, 0, 1], [0, 0, 0]]
    assert multi_hot(pl.Series([[1], [0, 1]], dtype=pl.List(pl.Int32)), k=2).tolist() == [[0, 1], [1, 1]]
