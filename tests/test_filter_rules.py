"""The paper's filter (paper-notes.md), the split and the vocabulary, against plain-Python references."""

from __future__ import annotations

import random

import numpy as np
import polars as pl
import pytest

from pipeline.filtering import assign_split, filter_prompts, filter_report
from pipeline.vocabulary import build_vocabulary, label_indices


def reference_filter(prompts: list) -> list[int]:
    """Row numbers kept, by the rules in order, one row at a time (two near-duplicate passes)."""
    eligible = []
    for i, p in enumerate(prompts):
        if p is None:
            continue
        s = p.strip()
        if not s or not s.isascii():
            continue
        eligible.append((i, s))
    seen, after_prefix = set(), []
    for i, s in eligible:
        if s[:50] not in seen:
            seen.add(s[:50])
            after_prefix.append((i, s))
    seen, kept = set(), []
    for i, s in after_prefix:
        if s[-50:] not in seen:
            seen.add(s[-50:])
            kept.append(i)
    return kept


def frame(prompts):
    return pl.DataFrame({"id": list(range(len(prompts))), "prompt": prompts}, schema={"id": pl.Int64, "prompt": pl.String})


def test_rules_each():
    long_a = "a castle on a hill at dawn, matte painting, by greg rutkowski, trending"
    prompts = [
        "  a red cat  ",  # kept, stripped
        "",  # empty
        "   \t ",  # whitespace only
        None,  # null
        "café au lait, 4k",  # non-ASCII
        "a red cat",  # exact duplicate after strip
        long_a,  # kept
        long_a[:50] + " something else entirely, different ending",  # shares prefix
        "different beginning here and more words, " + long_a[-50:],  # shares suffix
        "🐱 cat",  # emoji: non-ASCII
    ]
    out = filter_prompts(frame(prompts))
    assert out["id"].to_list() == [0, 6]
    assert out["prompt"].to_list() == ["a red cat", long_a]
    _, counts = filter_report(frame(prompts))
    assert counts == {"empty": 3, "non_ascii": 2, "duplicate_prefix": 2, "duplicate_suffix": 1, "kept": 2}


def test_other_columns_pass_through_and_order_is_kept():
    f = pl.DataFrame({"prompt": ["b prompt", "a prompt"], "x": [1.5, 2.5], "tag": ["p", "q"]})
    out = filter_prompts(f)
    assert out.columns == ["prompt", "x", "tag"]
    assert out["x"].to_list() == [1.5, 2.5]


def test_short_prompts_compare_whole_text():
    out = filter_prompts(frame(["cat", "cat dog", "dog"]))
    assert out["prompt"].to_list() == ["cat", "cat dog", "dog"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_prompts(seed):
    rng = random.Random(seed)
    words = ["red", "cat", "blue", "dog", "by", "artstation", "4k", "octane", "render", "x"]
    prompts = []
    for _ in range(3000):
        r = rng.random()
        if r < 0.05 and prompts:
            prompts.append(rng.choice(prompts))
        elif r < 0.08:
            prompts.append(rng.choice([None, "", "  ", "\n"]))
        elif r < 0.1:
            prompts.append("naïve " + " ".join(rng.choices(words, k=5)))
        else:
            text = " ".join(rng.choices(words, k=rng.randint(1, 25)))
            prompts.append(rng.choice(["", " ", "  "]) + text + rng.choice(["", " ", "\t"]))
    out = filter_prompts(frame(prompts))
    assert out["id"].to_list() == reference_filter(prompts)
    _, counts = filter_report(frame(prompts))
    assert sum(counts.values()) == len(prompts)


def test_split_is_deterministic_disjoint_and_order_free():
    prompts = [f"prompt number {i}" for i in range(30000)]
    a = assign_split(pl.DataFrame({"prompt": prompts}))
    b = assign_split(pl.DataFrame({"prompt": prompts[::-1]}))
    mapping_a = dict(zip(a["prompt"], a["split"]))
    mapping_b = dict(zip(b["prompt"], b["split"]))
    assert mapping_a == mapping_b
    shares = a["split"].value_counts().sort("split")
    counts = dict(zip(shares["split"], shares["count"]))
    assert abs(counts["train"] / 30000 - 670 / 730) < 0.01
    assert abs(counts["test"] / 30000 - 30 / 730) < 0.006
    # another seed moves prompts between splits
    c = assign_split(pl.DataFrame({"prompt": prompts}), seed=1)
    assert (c["split"] != a["split"]).sum() > 0
    with pytest.raises(ValueError):
        assign_split(pl.DataFrame({"prompt": prompts}), ratios=(1, 2))


def test_vocabulary_top_words_without_stop_words_or_numbers():
    prompts = ["a red cat and a red dog", "the red car, 4k", "blue cat by artist", "cat 3d render"]
    vocab = build_vocabulary(prompts, k=3)
    assert vocab["word"].to_list() == ["cat", "red", "artist"]
    assert vocab["count"].to_list() == [3, 2, 1]
    assert "the" not in vocab["word"].to_list() and "4k" not in vocab["word"].to_list()
    labels = label_indices(["red cat", "nothing here", "Cat CAT artist"], vocab)
    assert [list(x) for x in labels] == [[0, 1], [], [0, 2]]
    assert all(x.dtype == np.int32 for x in labels)
